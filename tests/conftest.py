"""Shared fixtures: the miniature model (built once per session) and settings helpers."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from zimage_stream.broker import FETCH_MAX_WAIT_MS
from zimage_stream.engine import ImageEngine
from zimage_stream.engine.tiny import ensure_tiny_pipeline
from zimage_stream.settings import EngineSettings, Settings
from zimage_stream.testing import RedisServer

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The miniature random-weight pipeline, saved as a real diffusers folder."""
    directory = Path(os.environ.get("ZIMAGE_TEST_TINY_DIR", REPO / ".cache" / "zimage-tiny"))
    return ensure_tiny_pipeline(directory)


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir: Path) -> ImageEngine:
    """The miniature model loaded in float32 (fast on a CPU), once per test module."""
    engine = ImageEngine(
        EngineSettings(model="tiny", dtype="float32", tiny_model_dir=tiny_model_dir)
    )
    engine.load()
    return engine


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private Redis (tests stop and restart it); skipped where no redis-server exists."""
    try:
        server = RedisServer.on_free_port()
    except FileNotFoundError as missing:
        pytest.skip(str(missing))
    with server:
        yield server


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:10]


def make_settings(**overrides: object) -> Settings:
    """Settings for tests: the tiny model in float32 (fast on a CPU), short windows."""
    base: dict[str, object] = {
        "model": "tiny",
        "dtype": "float32",
        "batch_window_ms": 50,
        "redis_url": "",
        "shutdown_grace_s": 30.0,
        "http_port": -1,  # two workers in one process would want the same port
        "kafka_fetch_max_wait_ms": FETCH_MAX_WAIT_MS,  # the embedded broker holds fetches
        # Later engine processes fork from a server with torch imported: seconds saved on
        # each of the suite's many workers (test_engine_process.py keeps spawn, the default).
        "engine_start_method": "forkserver",
    }
    base.update(overrides)
    return Settings(_env_file=None, **base)  # type: ignore[call-arg]
