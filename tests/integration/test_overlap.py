"""The stages overlap: the device never waits for storage, and fetching goes on during inference."""

from __future__ import annotations

import asyncio
from datetime import datetime

from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from tests.integration.conftest import KafkaIO, generate
from zimage_stream.settings import Settings
from zimage_stream.storage import Storage, StoredObject
from zimage_stream.testing import running_worker
from zimage_stream.worker import Worker


class SlowStorage(Storage):
    """Local storage that takes a second per write, like a slow S3."""

    async def put_image(self, data: bytes, extension: str) -> StoredObject:
        await asyncio.sleep(1.0)
        return await super().put_image(data, extension)


async def test_next_batch_runs_while_the_previous_one_is_stored(
    settings: Settings, kafka_io: KafkaIO
) -> None:
    settings = settings.replace(batch_window_ms=0)
    storage = Storage.from_settings(settings.storage)
    slow = SlowStorage(storage._store, storage._uri_prefix, storage.root)
    worker = Worker(settings, storage=slow)
    async with running_worker(settings, worker) as worker:
        with capture_logs(processors=[merge_contextvars]) as logs:
            await kafka_io.send(generate("first", width=256, height=256), partition=0)
            await kafka_io.send(generate("second", width=320, height=256), partition=0)
            results = await kafka_io.results(2)
    assert {r["status"] for r in results} == {"succeeded"}
    order = [
        (e["event"], e.get("batch_id"))
        for e in logs
        if e["event"] in ("batch_done", "batch_answered")
    ]
    # Batch 2 finished on the device before batch 1's (slow) results were published.
    assert order.index(("batch_done", "b2")) < order.index(("batch_answered", "b1"))


async def test_rejections_are_answered_during_a_long_inference(
    settings: Settings, kafka_io: KafkaIO
) -> None:
    async with running_worker(settings):
        # A budget well past the default 30 s: the test is about the rejection overtaking
        # the long inference, and on two busy cores the inference alone can take 30 s.
        request = generate("long", width=1024, height=1024, num_images=4, num_inference_steps=8)
        await kafka_io.send({**request, "timeout_s": 120})
        await asyncio.sleep(1.0)  # the batch is on the device now
        await kafka_io.send(generate("bad", width=100))
        results = {r["request_id"]: r for r in await kafka_io.results(2)}
    long, bad = results["long"], results["bad"]
    assert long["status"] == "succeeded" and bad["status"] == "rejected"
    assert datetime.fromisoformat(bad["completed_at"]) < datetime.fromisoformat(
        long["completed_at"]
    )
    assert long["timings_ms"]["inference"] > 1000
