"""Worker lifecycle through the real broker: graceful SIGTERM, backpressure under a flood
with batches longer than ``max_poll_interval_ms``, and a second worker joining and the
first leaving mid-stream. Each test counts requests in and results out."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from structlog.testing import capture_logs

from tests.integration.conftest import (
    KafkaIO,
    generate,
    send_slow_requests,
    start_worker_process,
    wait_for_ids,
    wait_for_results,
)
from zimage_stream.engine.calls import Faults
from zimage_stream.settings import Settings
from zimage_stream.testing import running_worker
from zimage_stream.worker import Worker


def _by_id(results: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for result in results:
        grouped.setdefault(result["request_id"], []).append(result)
    return grouped


async def _slow_steps(worker: Worker, seconds: float) -> None:
    await worker.engine.set_faults(Faults(step_sleep_s=seconds))


async def test_sigterm_finishes_the_running_batch_commits_and_exits_zero(
    settings: Settings, kafka_io: KafkaIO, tmp_path: Path
) -> None:
    settings = settings.replace(max_batch_size=2, batch_window_ms=200)
    ids = [f"term-{i}" for i in range(8)]
    await send_slow_requests(kafka_io, ids)
    worker = await start_worker_process(settings, tmp_path / "worker.log")
    await wait_for_results(kafka_io, 1, timeout_s=120)
    worker.send_signal(signal.SIGTERM)
    code = await asyncio.wait_for(worker.wait(), timeout=60)
    assert code == 0, (tmp_path / "worker.log").read_text()[-2000:]
    text = (tmp_path / "worker.log").read_text()
    assert "worker_stopped" in text
    before = _by_id(await kafka_io.results(1))
    assert len(before) < len(ids), "SIGTERM came too late to test anything"
    # What was answered before the exit was committed, and nothing beyond it.
    committed = (await kafka_io.committed()).get(0)
    assert committed == len(before), (committed, sorted(before))
    # The rest is answered by the next worker; nothing is lost, nothing answered twice.
    async with running_worker(settings):
        results = await wait_for_ids(kafka_io, set(ids), timeout_s=180)
    after = _by_id(results)
    assert set(after) == set(ids)
    assert all(len(answers) == 1 for answers in after.values()), after
    assert all(a[0]["status"] == "succeeded" for a in after.values())


async def test_a_flood_pauses_fetching_and_long_batches_keep_the_member_in_its_group(
    settings: Settings, kafka_io: KafkaIO
) -> None:
    # Batches of ~3 s against a 2 s max_poll_interval_ms (aiokafka issue 848: a consumer
    # that stops polling while it works is expelled, and its commits fail forever).
    settings = settings.replace(
        max_in_flight=4,
        max_batch_size=2,
        batch_window_ms=100,
        kafka_max_poll_interval_ms=2000,
    )
    ids = [f"flood-{i}" for i in range(12)]
    async with running_worker(settings) as worker:
        await _slow_steps(worker, 0.4)
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, worker._require_consumer().in_flight)
                await asyncio.sleep(0.02)

        watcher = asyncio.create_task(watch())
        with capture_logs() as logs:
            for request_id in ids:
                await kafka_io.send(generate(request_id, f"shoe {request_id}"))
            results = await wait_for_ids(kafka_io, set(ids), timeout_s=240)
        watcher.cancel()
        committed = sum((await kafka_io.committed()).values())
    events = [e["event"] for e in logs]
    assert "consumer_paused" in events and "consumer_resumed" in events
    assert peak <= settings.batch.max_in_flight  # memory stays bounded by the high-water mark
    assert "partitions_revoked" not in events and "commit_failed" not in events
    grouped = _by_id(results)
    assert set(grouped) == set(ids) and all(len(a) == 1 for a in grouped.values())
    assert committed == len(ids)


async def test_a_worker_joining_and_one_leaving_mid_stream_lose_nothing(
    settings: Settings, kafka_io: KafkaIO
) -> None:
    settings = settings.replace(max_batch_size=2, batch_window_ms=50)
    ids = [f"rebal-{i}" for i in range(24)]

    async def publish(chunk: list[str]) -> None:
        for request_id in chunk:
            await kafka_io.send(generate(request_id, f"chair {request_id}", seed=7))

    with capture_logs() as logs:
        async with running_worker(settings) as first:
            await _slow_steps(first, 0.05)
            await publish(ids[:8])
            await wait_for_results(kafka_io, 2, timeout_s=120)
            async with running_worker(settings, Worker(settings)) as second:
                await _slow_steps(second, 0.05)
                await publish(ids[8:16])
                await wait_for_results(kafka_io, 10, timeout_s=120)
            # The second worker left (its partitions come back to the first).
            await publish(ids[16:])
            results = await wait_for_ids(kafka_io, set(ids), timeout_s=240)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if sum((await kafka_io.committed()).values()) == len(ids):
                    break
                await asyncio.sleep(0.2)
            committed = sum((await kafka_io.committed()).values())
    assert sum(e["event"] == "partitions_assigned" for e in logs) >= 3  # join, rebalance, leave
    grouped = _by_id(results)
    assert set(grouped) == set(ids)  # nothing lost
    for request_id, answers in grouped.items():
        assert all(a["status"] == "succeeded" for a in answers), request_id
        # A request answered twice (revoked mid-work) has the same objects both times.
        assert len({tuple(i["sha256"] for i in a["images"]) for a in answers}) == 1
    assert committed == len(ids)  # nothing stuck
