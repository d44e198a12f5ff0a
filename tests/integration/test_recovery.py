"""At-least-once: a worker killed with SIGKILL loses nothing; its successor answers the rest."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from tests.integration.conftest import (
    KafkaIO,
    generate,
    running_worker,
    start_worker_process,
)
from zimage_stream.settings import Settings


async def _wait_for_results(kafka_io: KafkaIO, at_least: int, timeout_s: float) -> list[dict]:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            return await kafka_io.results(at_least, timeout_s=2)
        except AssertionError:
            if asyncio.get_running_loop().time() > deadline:
                raise


async def _wait_for_ids(kafka_io: KafkaIO, ids: set[str], timeout_s: float) -> list[dict]:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        results = await _wait_for_results(kafka_io, 1, timeout_s=timeout_s)
        if {r["request_id"] for r in results} >= ids:
            return results
        assert asyncio.get_running_loop().time() < deadline, "not every request was answered"
        await asyncio.sleep(0.5)


async def test_killed_worker_requests_are_processed_after_restart(
    settings: Settings, kafka_io: KafkaIO, tmp_path: Path
) -> None:
    settings = settings.model_copy(update={"max_batch_size": 1, "batch_window_ms": 0})
    ids = [f"crash-{i}" for i in range(8)]
    for i, request_id in enumerate(ids):
        await kafka_io.send(
            generate(request_id, f"product {i}", width=512, height=512, num_inference_steps=8),
            partition=0,
        )
    first = await start_worker_process(settings, tmp_path / "worker-a.log")
    try:
        before = await _wait_for_results(kafka_io, 2, timeout_s=120)
    finally:
        first.send_signal(signal.SIGKILL)
        await first.wait()
    answered_before = {r["request_id"] for r in before}
    assert len(answered_before) < len(ids), "the kill came too late to test anything"

    async with running_worker(settings):
        results = await _wait_for_ids(kafka_io, set(ids), timeout_s=180)
    by_id: dict[str, list[dict]] = {}
    for result in results:
        by_id.setdefault(result["request_id"], []).append(result)
    assert set(by_id) == set(ids)  # nothing lost
    for request_id, answers in by_id.items():
        assert all(a["status"] == "succeeded" for a in answers), request_id
        # A repeat (answered before the kill and again after it) writes the same objects.
        shas = {tuple(i["sha256"] for i in a["images"]) for a in answers}
        assert len(shas) == 1, request_id
    committed = await kafka_io.committed()
    assert committed.get(0) == len(ids)
