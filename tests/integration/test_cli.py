"""The command line as a user runs it: separate processes, real broker."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import run_cli
from tests.support.render import LATIN_FONT, cjk_font, png_bytes, product_scene, with_text
from zimage_stream.settings import Settings
from zimage_stream.testing import running_worker
from zimage_stream.topics import client_topics, missing_topics

CLI = [sys.executable, "-m", "zimage_stream.cli"]


def test_schema_prints_both_event_schemas() -> None:
    out = subprocess.run([*CLI, "schema"], capture_output=True, text=True, check=True)
    schemas = json.loads(out.stdout)
    assert set(schemas) == {"request", "result"}
    assert "GenerateParams" in schemas["request"]["$defs"]


async def test_submit_wait_prints_the_result(settings: Settings) -> None:
    async with running_worker(settings):
        code, stdout, stderr = await run_cli(
            settings,
            "submit",
            "a walnut cutting board",
            "--style",
            "warm_lifestyle",
            "--width",
            "256",
            "--height",
            "256",
            "--num-images",
            "2",
            "--seed",
            "9",
            "--request-id",
            "cli-1",
            "--wait",
            "--timeout",
            "120",
        )
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["request_id"] == "cli-1" and result["status"] == "succeeded"
    assert len(result["images"]) == 2
    for ref in result["images"]:
        assert Path(ref["uri"].removeprefix("file://")).is_file()


def test_demo_runs_on_its_defaults_and_cleans_up(tmp_path: Path, tiny_model_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZIMAGE_")}
    env["ZIMAGE_TINY_MODEL_DIR"] = str(tiny_model_dir)
    out = subprocess.run(
        [*CLI, "demo", "--output", str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    paths = [Path(line) for line in lines if line.endswith(".png")]
    assert len(paths) == 4 and all(p.is_file() for p in paths)
    assert all(p.is_relative_to(tmp_path / "out") for p in paths)
    result = json.loads("\n".join(line for line in lines if not line.endswith(".png")))
    assert result["status"] == "succeeded" and result["model"]["id"] == "tiny"
    assert "ready: device=cpu" in out.stderr
    # The embedded broker is gone: nothing listens on its port any more.
    match = re.search(r"broker: Tansu on 127\.0\.0\.1:(\d+)", out.stderr)
    assert match is not None
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(match.group(1))), timeout=1).close()


async def test_erase_with_the_diffusion_engine_loads_the_model(
    settings: Settings, tmp_path: Path
) -> None:
    rendered = with_text(
        product_scene(320, 240), [("SALE", (20, 20), LATIN_FONT, 36, (200, 20, 20))]
    )
    image, output = tmp_path / "in.png", tmp_path / "out.png"
    image.write_bytes(png_bytes(rendered.image))
    code, stdout, stderr = await run_cli(
        settings, "erase", str(image), "-o", str(output), "--engine", "diffusion"
    )
    assert code == 0, stderr
    assert any("SALE" in region["text"] for region in json.loads(stdout)["text_regions"])
    with Image.open(output) as cleaned:
        assert cleaned.size == (320, 240)
        changed = np.asarray(cleaned.convert("RGB")) != np.asarray(rendered.image)
    assert changed.any(-1)[rendered.strokes].mean() > 0.5  # the text's pixels were filled


def test_erase_languages_keeps_the_other_scripts_line(tmp_path: Path) -> None:
    font = cjk_font()
    if font is None:
        pytest.skip("no CJK font (apt-get install fonts-wqy-zenhei)")
    english = with_text(
        product_scene(), [("SALE 50% OFF", (60, 60), LATIN_FONT, 48, (200, 20, 20))]
    )
    both = with_text(english.image, [("限时特惠 包邮", (560, 650), font, 56, (25, 25, 25))])
    image, output = tmp_path / "in.png", tmp_path / "out.png"
    image.write_bytes(png_bytes(both.image))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZIMAGE_")}
    out = subprocess.run(
        [
            *CLI,
            "erase",
            str(image),
            "-o",
            str(output),
            "--engine",
            "classical",
            "--languages",
            "en",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    texts = [region["text"] for region in json.loads(out.stdout)["text_regions"]]
    assert texts and all("限" not in text for text in texts), texts
    with Image.open(output) as cleaned:
        pixels = np.asarray(cleaned.convert("RGB"))
    before = np.asarray(both.image)
    chinese = both.strokes & ~english.strokes
    assert np.array_equal(pixels[chinese], before[chinese]), "the Chinese line was touched"
    assert (pixels != before).any(-1)[english.strokes].mean() > 0.5, "the English line stayed"


def test_python_dash_m_runs_the_command_line() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "zimage_stream", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.startswith("zimage-stream ")


async def test_submit_wait_creates_no_topic_when_told_not_to(settings: Settings) -> None:
    code, _, stderr = await run_cli(
        settings,
        "submit",
        "a mug",
        "--wait",
        "--timeout",
        "5",
        extra_env={"ZIMAGE_CREATE_TOPICS": "false"},
    )
    (line,) = stderr.strip().splitlines()
    assert code == 2 and line.startswith("zimage-stream submit: error: ZIMAGE_CREATE_TOPICS=false")
    assert settings.kafka.results_topic in line
    assert await missing_topics(settings.kafka, client_topics(settings.kafka)) == [
        settings.kafka.requests_topic,
        settings.kafka.results_topic,
    ]
