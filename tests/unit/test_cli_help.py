"""What ``--help`` tells a new user: what the tool is, every setting with its default,
and each option's meaning and default; and what the terminal shows while a replay reads."""

from __future__ import annotations

import io
import json
import sys
from typing import Any

import pytest

from zimage_stream import cli
from zimage_stream import replay as replay_module
from zimage_stream.cli import main
from zimage_stream.replay import ReplaySummary
from zimage_stream.settings import Settings


def _help(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as done:
        main([*args, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_the_top_level_help_says_what_the_tool_is(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(capsys)
    assert "image worker" in text and "worker --help" in text
    assert "Settings are read here" not in text  # the module's docstring is for developers


def test_worker_help_lists_every_setting_with_its_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = _help(capsys, "worker")
    for variable in Settings.variable_names():
        assert variable in text, variable
    lines = {
        line.split()[0]: line.split()[1] for line in text.splitlines() if "ZIMAGE_" in line[:12]
    }
    assert lines["ZIMAGE_KAFKA_BOOTSTRAP_SERVERS"] == "localhost:9092"
    assert lines["ZIMAGE_BATCH_WINDOW_MS"] == "50"
    assert lines["ZIMAGE_REDIS_URL"] == '""' and lines["ZIMAGE_KAFKA_SASL_PASSWORD"] == "unset"


def test_submit_options_say_what_they_mean_and_their_defaults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = " ".join(_help(capsys, "submit").split())
    assert "--width WIDTH pixels, a multiple of 16 (default: 1024)" in text
    assert "--num-images NUM_IMAGES candidates, 1-8 (default: 4)" in text
    assert "--timeout TIMEOUT seconds to wait for the result (default: 600.0)" in text


def test_section_descriptions_are_whole_and_plain_text(
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = _help(capsys, "worker")
    assert "``" not in text  # RST markup is for the docstrings, not the terminal
    assert "downloaded only if allowed" in " ".join(text.split())  # the ocr section's end


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_replay_progress_line_ends_when_offset_gaps_stop_it_short(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def replay(_kafka: object, **options: Any) -> ReplaySummary:
        options["on_record"](1, 5)
        options["on_record"](3, 5)  # offsets 2 and 4 were compacted away: never 5/5
        return ReplaySummary(ranges={0: (0, 5)}, published=3)

    async def reachable(_kafka: object) -> None:
        pass

    monkeypatch.setattr(replay_module, "replay", replay)
    monkeypatch.setattr(cli, "check_broker", reachable)
    monkeypatch.setattr(cli, "configure_logging", lambda *args, **kwargs: None)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["replay", "--from-offset", "0:0"]) == 0
    assert terminal.getvalue() == "\rread 1/5\rread 3/5\n"
    assert json.loads(capsys.readouterr().out)["published"] == 3
