"""The engine process's supervisor on its own: a process that crashes or hangs while it
loads is killed and the error raised (nothing is left running), and a suspect's call
runs with nothing else inside the engine. (Crashes and hangs during calls, through the
broker: ``tests/integration/test_engine_process.py``.)"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from pathlib import Path

import pytest

from zimage_stream.engine.calls import Faults
from zimage_stream.engine_process import EngineProcess
from zimage_stream.errors import ModelUnavailableError
from zimage_stream.settings import EngineSettings


def _settings(tiny_model_dir: Path, **overrides: object) -> EngineSettings:
    return EngineSettings(
        model="tiny",
        dtype="float32",
        tiny_model_dir=tiny_model_dir,
        engine_start_method="spawn",  # its process is ours: active_children() sees it
        **overrides,  # type: ignore[arg-type]
    )


def _engine_processes() -> list[str]:
    return [p.name for p in multiprocessing.active_children() if p.name == "zimage-engine"]


async def test_a_process_that_crashes_while_loading_fails_the_start_and_is_gone(
    tiny_model_dir: Path,
) -> None:
    engine = EngineProcess(_settings(tiny_model_dir), faults=Faults(at_load="crash"))
    with pytest.raises(ModelUnavailableError, match="while loading"):
        await engine.start()
    await engine.stop()
    assert not engine.loaded and _engine_processes() == []


async def test_a_process_that_hangs_while_loading_is_killed_after_the_load_timeout(
    tiny_model_dir: Path,
) -> None:
    settings = _settings(tiny_model_dir, engine_load_timeout_s=10)
    engine = EngineProcess(settings, faults=Faults(at_load="hang"))
    started = time.monotonic()
    with pytest.raises(ModelUnavailableError, match="within 10 s"):
        await engine.start()
    assert time.monotonic() - started < 10 + 15  # the timeout, a spawn and a kill
    await engine.stop()
    assert _engine_processes() == []


async def test_a_call_that_runs_alone_waits_for_the_others_and_holds_new_ones_back(
    tiny_model_dir: Path,
) -> None:
    engine = EngineProcess(_settings(tiny_model_dir))
    inside: list[str] = []
    order: list[str] = []
    release = {name: asyncio.Event() for name in ("a", "b", "suspect", "c")}

    async def call(name: str, alone: bool) -> None:
        async with engine._admission(alone):
            inside.append(name)
            order.append(name)
            assert not alone or inside == [name], inside  # a suspect is alone inside
            await release[name].wait()
            inside.remove(name)

    a = asyncio.create_task(call("a", False))
    b = asyncio.create_task(call("b", False))
    await asyncio.sleep(0.01)
    suspect = asyncio.create_task(call("suspect", True))
    await asyncio.sleep(0.01)
    c = asyncio.create_task(call("c", False))  # arrives while the suspect waits
    await asyncio.sleep(0.01)
    assert order == ["a", "b"]
    release["a"].set()
    release["b"].set()
    await asyncio.sleep(0.01)
    assert order == ["a", "b", "suspect"]
    release["suspect"].set()
    release["c"].set()
    await asyncio.gather(a, b, suspect, c)
    assert order == ["a", "b", "suspect", "c"]
