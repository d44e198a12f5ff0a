"""The engine in its own supervised process, with faults injected for real through the
broker: a request whose pipeline call segfaults the engine process, one whose call never
returns, and one that kills the worker itself (as the OOM killer would) while a
supervisor starts it again. Innocents succeed, the culprit is dead-lettered and answered
``poison_request`` after ``ZIMAGE_POISON_ATTEMPTS`` deaths (or ``timed_out`` when it
hung), committed offsets reach the end of the partition, and no request is answered
twice with different images."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from tests.integration.conftest import KafkaIO, generate, worker_env
from zimage_stream.engine.calls import Faults
from zimage_stream.engine_process import EngineProcess
from zimage_stream.settings import Settings
from zimage_stream.testing import running_worker
from zimage_stream.worker import Worker


async def _committed_to(kafka_io: KafkaIO, end: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while (committed := (await kafka_io.committed()).get(0, 0)) < end:
        assert time.monotonic() < deadline, f"committed {committed} of {end}"
        await asyncio.sleep(0.2)


def _once_each(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Results by request id; a request answered twice must have been answered the same."""
    seen: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for result in results:
        seen[result["request_id"]].append(result)
    for request_id, answers in seen.items():
        images = {json.dumps(a.get("images"), sort_keys=True) for a in answers}
        statuses = {a["status"] for a in answers}
        assert len(images) == 1 and len(statuses) == 1, (request_id, answers)
    return {request_id: answers[0] for request_id, answers in seen.items()}


async def _poison_dead_letter(kafka_io: KafkaIO, settings: Settings, request: dict) -> None:
    (dead,) = await kafka_io.read(settings.kafka.dlq_topic, 1)
    assert dead.json() == request
    assert dead.headers["error.code"] == b"poison_request"
    assert dead.headers["attempts"] == str(settings.engine.poison_attempts).encode()
    assert dead.headers["source.partition"] == b"0"


async def test_a_request_that_segfaults_the_engine_is_poison_and_its_neighbours_succeed(
    settings: Settings, kafka_io: KafkaIO
) -> None:
    settings = settings.replace(batch_window_ms=1500, engine_start_method="spawn")
    poison = generate("poison", "a mug, CRASH")
    batch = [generate("a", "a lamp"), generate("b", "a vase"), poison, generate("c", "a cup")]
    after = [generate("d", "a bowl"), generate("e", "a plate")]
    engine = EngineProcess(settings.engine, settings.ocr, Faults(crash_on="CRASH"))
    async with running_worker(settings, Worker(settings, engine=engine)) as worker:
        for request in batch + after:
            await kafka_io.send(request, partition=0)
        results = _once_each(await kafka_io.results(6, timeout_s=240))
        await _committed_to(kafka_io, 6)
        # It died inside the batch, then alone: two deaths, two restarts, and ready again.
        assert worker.engine_restarts() == {"crashed": 2}
        assert worker.engine.report.restarts == 2 and worker.engine.ready.is_set()
        metrics = worker.metrics.exposition().decode()
        assert 'zimage_engine_restarts_total{reason="crashed"} 2.0' in metrics
        assert 'zimage_engine_restarts_total{reason="hung"} 0.0' in metrics
    assert results["poison"]["status"] == "failed"
    assert results["poison"]["error"]["code"] == "poison_request"
    assert results["poison"]["error"]["retriable"] is False
    for request_id in "abcde":
        assert results[request_id]["status"] == "succeeded", results[request_id]
    await _poison_dead_letter(kafka_io, settings, poison)


async def test_a_request_that_hangs_the_engine_is_timed_out_and_the_engine_restarted(
    settings: Settings, kafka_io: KafkaIO
) -> None:
    settings = settings.replace(batch_window_ms=1500, engine_grace_s=2)
    hung = {**generate("hung", "a mug, HANG"), "timeout_s": 3}
    others = [generate("a", "a lamp"), generate("b", "a vase")]
    engine = EngineProcess(settings.engine, settings.ocr, Faults(hang_on="HANG"))
    async with running_worker(settings, Worker(settings, engine=engine)) as worker:
        readiness: list[bool] = []

        async def watch_readiness() -> None:  # what /readyz says, every 50 ms
            while True:
                readiness.append(worker._readiness()["ready"])
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch_readiness())
        sent = time.monotonic()
        for request in [others[0], hung, others[1]]:
            await kafka_io.send(request, partition=0)
        results = _once_each(await kafka_io.results(3, timeout_s=180))
        answered_s = time.monotonic() - sent
        await _committed_to(kafka_io, 3)
        watcher.cancel()
        # Not ready while the engine process was started again, ready after.
        assert readiness[0] and False in readiness and readiness[-1], readiness
        assert worker.engine_restarts() == {"hung": 1}
        report = worker.engine.report
        assert report.restart_reason == "hung" and report.restart_s is not None
    assert results["hung"]["status"] == "timed_out", results["hung"]
    assert results["hung"]["error"]["code"] == "timeout"
    assert results["a"]["status"] == results["b"]["status"] == "succeeded"
    # Within its budget, the grace, the batch window, a restart and the two re-runs.
    assert answered_s < 3 + 2 + 1.5 + report.restart_s + 30, answered_s


async def test_a_request_that_kills_the_worker_is_poison_after_the_same_number_of_deaths(
    settings: Settings, kafka_io: KafkaIO, tmp_path: Path
) -> None:
    """The worker itself dies (SIGKILL) with the request inside: its deaths are counted
    where the next worker sees them (here the attempts file: no Redis)."""
    settings = settings.replace(batch_window_ms=1500, kafka_session_timeout_ms=6000)
    poison = generate("poison", "a mug, KILL")
    for request in [generate("a", "a lamp"), poison, generate("c", "a cup")]:
        await kafka_io.send(request, partition=0)
    await kafka_io.send(generate("d", "a bowl"), partition=0)
    faults = json.dumps({"kill_worker_on": "KILL"})
    deaths, results, everyone = 0, [], {"a", "poison", "c", "d"}
    for start in range(4):  # a supervisor starting the worker again, as Kubernetes would
        log_path = tmp_path / f"worker-{start}.log"
        with log_path.open("wb") as log:
            worker = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.support.faulty_worker",
                faults,
                env=worker_env(settings),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            while worker.returncode is None and {r["request_id"] for r in results} != everyone:
                with contextlib.suppress(AssertionError):  # fewer than four yet
                    results = await kafka_io.results(4, timeout_s=2)
            if worker.returncode is None:
                await _committed_to(kafka_io, 4)
                break
            assert worker.returncode == -9, log_path.read_text()[-3000:]
            deaths += 1
        finally:
            if worker.returncode is None:
                worker.terminate()
                await asyncio.wait_for(worker.wait(), 60)
    answers = _once_each(results)
    assert deaths == settings.engine.poison_attempts
    assert answers["poison"]["error"]["code"] == "poison_request"
    for request_id in "acd":
        assert answers[request_id]["status"] == "succeeded", answers[request_id]
    await _poison_dead_letter(kafka_io, settings, poison)
