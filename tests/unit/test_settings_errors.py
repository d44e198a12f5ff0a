"""What a wrong or misspelt ``ZIMAGE_*`` variable tells the operator."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from zimage_stream import cli
from zimage_stream.cli import main
from zimage_stream.settings import Settings, StorageSettings, explain, unknown_variables
from zimage_stream.storage import Storage


def test_a_misspelt_variable_is_named_with_the_nearest_setting() -> None:
    found = unknown_variables(
        ["ZIMAGE_BATCH_WINDOW", "ZIMAGE_KAFKA_BOOTSTRAP_SERVER", "ZIMAGE_MODEL", "PATH", "ZIMAGE_X"]
    )
    assert found == [
        ("ZIMAGE_BATCH_WINDOW", "ZIMAGE_BATCH_WINDOW_MS"),
        ("ZIMAGE_KAFKA_BOOTSTRAP_SERVER", "ZIMAGE_KAFKA_BOOTSTRAP_SERVERS"),
        ("ZIMAGE_X", None),
    ]


def test_every_real_variable_is_known() -> None:
    assert unknown_variables(Settings.variable_names()) == []


def test_a_wrong_value_names_its_variable_and_hides_secrets() -> None:
    with pytest.raises(ValidationError) as info:
        Settings(  # type: ignore[call-arg]
            _env_file=None, batch_window_ms="soon", kafka_sasl_password=5, http_port=70000
        )
    message = str(explain(info.value))
    assert "ZIMAGE_BATCH_WINDOW_MS=soon: Input should be a valid integer" in message
    assert "ZIMAGE_HTTP_PORT=70000" in message
    assert "ZIMAGE_KAFKA_SASL_PASSWORD:" in message and "5" not in message.split("PASSWORD")[1][:3]
    assert "\n" not in message


def test_a_storage_folder_that_cannot_be_made_is_one_line_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a-file").write_bytes(b"")
    unusable = tmp_path / "a-file" / "images"
    with pytest.raises(ValueError, match=r"ZIMAGE_STORAGE_URL=.*cannot create the folder"):
        Storage.from_settings(StorageSettings(url=str(unusable)))
    monkeypatch.setenv("ZIMAGE_STORAGE_URL", str(unusable))
    _keep_logging(monkeypatch)
    monkeypatch.chdir(tmp_path)  # no .env file of the checkout
    assert main(["worker"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("zimage-stream worker: error: ZIMAGE_STORAGE_URL=")


def test_a_redis_url_of_another_scheme_names_its_variable_and_hides_its_password() -> None:
    with pytest.raises(ValidationError) as info:
        Settings(_env_file=None, redis_url="http://user:hunter2@cache:6379")  # type: ignore[call-arg]
    message = str(explain(info.value))
    assert message.startswith("ZIMAGE_REDIS_URL=http://***@cache:6379: ")
    assert "rediss://" in message and "hunter2" not in message


def test_submit_refuses_a_request_the_worker_would_refuse_before_connecting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ZIMAGE_KAFKA_BOOTSTRAP_SERVERS", "nowhere.invalid:9092")
    _keep_logging(monkeypatch)
    assert main(["submit", "a mug", "--width", "100"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("zimage-stream submit: error: params.width: ")


def _keep_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command's logging would write to this test's captured stderr, closed after it:
    later tests' log lines would then fail."""
    monkeypatch.setattr(cli, "configure_logging", lambda *args, **kwargs: None)
