"""Making and publishing requests, and waiting for their results (``zimage-stream
submit``, the demo, the benchmarks)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from tqdm import tqdm

from .kafka_security import security_options
from .schemas import SCHEMA_VERSION, ProgressEvent, ResultEvent
from .settings import KafkaSettings


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:16]}"


def generate_request(
    prompt: str,
    request_id: str,
    style: str | None = None,
    width: int = 1024,
    height: int = 1024,
    num_images: int = 4,
    seed: int | None = None,
    steps: int = 8,
    guidance: float = 0.0,
) -> dict[str, Any]:
    """A ``generate`` request event as a JSON-ready dict, stamped ``submitted_at`` now."""
    params: dict[str, Any] = {
        "prompt": prompt,
        "style": style,
        "width": width,
        "height": height,
        "num_images": num_images,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
    }
    if seed is not None:
        params["seed"] = seed
    return {
        "schema_version": SCHEMA_VERSION,
        "request_id": request_id,
        "task": "generate",
        "params": params,
        "submitted_at": datetime.now(UTC).isoformat(),
    }


class ResultWaiter:
    """Reads the results topic from its current end, without a consumer group."""

    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        """Position at the end of every results (and progress) partition; call before
        publishing."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._settings.bootstrap_servers,
            enable_auto_commit=False,
            group_id=None,
            **security_options(self._settings),
        )
        await consumer.start()
        partitions = await topic_partitions(consumer, self._settings.results_topic)
        if self._settings.progress_topic:
            partitions += await topic_partitions(consumer, self._settings.progress_topic)
        consumer.assign(partitions)
        await consumer.seek_to_end(*partitions)
        for tp in partitions:
            await consumer.position(tp)  # resolve now, so nothing published later is missed
        self._consumer = consumer

    async def stop(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()

    async def wait_for(
        self, request_id: str, timeout_s: float, show_progress: bool = False
    ) -> ResultEvent:
        """The first result for ``request_id``; raises ``TimeoutError`` after ``timeout_s``.

        With a progress topic, the bar shows the request's denoising steps as they come.
        """
        assert self._consumer is not None, "call start() first"
        deadline = time.monotonic() + timeout_s
        key = request_id.encode()
        bar = tqdm(
            total=None,
            desc=request_id,
            unit="step",
            disable=not show_progress,
            leave=False,
        )
        try:
            while time.monotonic() < deadline:
                batches = await self._consumer.getmany(timeout_ms=200)
                bar.update(0)
                for tp, records in batches.items():
                    for record in records:
                        if record.key != key or record.value is None:
                            continue
                        if tp.topic == self._settings.results_topic:
                            return ResultEvent.model_validate_json(record.value)
                        progress = ProgressEvent.model_validate_json(record.value)
                        bar.total = progress.total
                        bar.update(progress.step - bar.n)
        finally:
            bar.close()
        raise TimeoutError(f"no result for {request_id} within {timeout_s:.0f} s")


async def topic_partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """The partitions of ``topic``, waiting briefly for the metadata to arrive."""
    for _ in range(50):
        found = consumer.partitions_for_topic(topic)
        if found:
            return [TopicPartition(topic, p) for p in sorted(found)]
        await consumer.topics()  # refreshes the metadata
        await asyncio.sleep(0.1)
    raise RuntimeError(f"topic {topic!r} does not exist on the broker")


async def publish_request(
    settings: KafkaSettings, request: dict[str, Any], headers: list[tuple[str, bytes]] | None = None
) -> None:
    """Publish one request event keyed by its request id."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, acks="all", **security_options(settings)
    )
    await producer.start()
    try:
        await producer.send_and_wait(
            settings.requests_topic,
            json.dumps(request).encode(),
            key=str(request["request_id"]).encode(),
            headers=headers or [],
        )
    finally:
        await producer.stop()
