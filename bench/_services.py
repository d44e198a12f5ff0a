"""Local services for the benchmarks: the embedded broker, a redis-server, a receiver
(the worker runs under ``zimage_stream.testing.running_worker``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

from zimage_stream.broker import FETCH_MAX_WAIT_MS, EmbeddedBroker
from zimage_stream.settings import Settings
from zimage_stream.testing import RedisServer


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A private redis-server on a free port; yields its URL (exits when none is installed)."""
    try:
        server = RedisServer.on_free_port()
    except FileNotFoundError as missing:
        raise SystemExit(str(missing)) from None
    with server:
        yield server.url


@contextlib.contextmanager
def broker() -> Iterator[str]:
    with EmbeddedBroker() as embedded:
        yield embedded.bootstrap_servers


def bench_settings(bootstrap: str, **overrides: object) -> Settings:
    folder = Path(tempfile.mkdtemp(prefix="zimage-bench-"))
    values: dict[str, object] = {
        "kafka_bootstrap_servers": bootstrap,
        "model": "tiny",
        "dtype": "float32",
        "storage_url": str(folder / "images"),
        "topic_partitions": 3,
        "requests_topic": f"bench-req-{folder.name}",
        "results_topic": f"bench-res-{folder.name}",
        "dlq_topic": f"bench-dlq-{folder.name}",
        "group_id": f"bench-{folder.name}",
        "http_port": -1,
        "kafka_fetch_max_wait_ms": FETCH_MAX_WAIT_MS,  # the embedded broker holds fetches
        # The embedded broker held a worker's first join for about 15 s at Kafka's 30 s
        # session timeout, 3 s at 6 s (as in the integration tests); the benches time
        # requests only after the worker has joined, so this shortens their set-up only.
        "kafka_session_timeout_ms": 6000,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class Receiver:
    """Reads the results topic and records when each request's result arrived."""

    def __init__(self, settings: Settings) -> None:
        self.arrived: dict[str, tuple[float, dict]] = {}
        self._settings = settings
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka.bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        topic = self._settings.kafka.results_topic
        await self._consumer.topics()
        partitions = [
            TopicPartition(topic, p)
            for p in sorted(self._consumer.partitions_for_topic(topic) or [])
        ]
        self._consumer.assign(partitions)
        await self._consumer.seek_to_end(*partitions)
        for tp in partitions:
            await self._consumer.position(tp)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            for records in (await self._consumer.getmany(timeout_ms=50)).values():
                now = time.perf_counter()
                for record in records:
                    result = json.loads(record.value)
                    self.arrived[result["request_id"]] = (now, result)

    async def wait_for(self, ids: set[str], timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while not ids <= set(self.arrived):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(ids - set(self.arrived))} results missing")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        await self._consumer.stop()
