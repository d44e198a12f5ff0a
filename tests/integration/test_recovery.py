"""At-least-once: a worker killed with SIGKILL loses nothing; its successor answers the rest."""

from __future__ import annotations

import signal
from pathlib import Path

from tests.integration.conftest import (
    KafkaIO,
    send_slow_requests,
    start_worker_process,
    wait_for_ids,
    wait_for_results,
)
from zimage_stream.settings import Settings
from zimage_stream.testing import running_worker


async def test_killed_worker_requests_are_processed_after_restart(
    settings: Settings, kafka_io: KafkaIO, tmp_path: Path
) -> None:
    settings = settings.replace(max_batch_size=1, batch_window_ms=0)
    ids = [f"crash-{i}" for i in range(8)]
    await send_slow_requests(kafka_io, ids)
    first = await start_worker_process(settings, tmp_path / "worker-a.log")
    try:
        before = await wait_for_results(kafka_io, 2, timeout_s=120)
    finally:
        first.send_signal(signal.SIGKILL)
        await first.wait()
    answered_before = {r["request_id"] for r in before}
    assert len(answered_before) < len(ids), "the kill came too late to test anything"

    async with running_worker(settings):
        results = await wait_for_ids(kafka_io, set(ids), timeout_s=180)
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
