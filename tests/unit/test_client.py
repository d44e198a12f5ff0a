"""The client library's pieces that need no broker: its Kafka options are the worker's,
what ``erase`` sends for bytes, a file or a URI, and how the results reader lives and dies
(against fake Kafka clients; tests/integration/test_client.py uses the real broker)."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition
from structlog.testing import capture_logs

from zimage_stream import client as client_module
from zimage_stream.client import (
    ResultTimeout,
    ZImageClient,
    erase_request,
    generate_request,
    source_of,
)
from zimage_stream.kafka_security import security_options
from zimage_stream.schemas import EraseTextRequest, ProgressEvent, parse_request
from zimage_stream.settings import KafkaSettings


def test_the_client_takes_the_workers_kafka_options_by_name() -> None:
    client = ZImageClient(
        "broker:9093",
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="svc",
        sasl_password="secret",
        results_topic="images.results",
    )
    assert client.settings.bootstrap_servers == "broker:9093"
    assert client.settings.results_topic == "images.results"
    assert security_options(client.settings) == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "svc",
        "sasl_plain_password": "secret",
    }
    with pytest.raises(TypeError):
        ZImageClient("broker:9093", settings=KafkaSettings())
    with pytest.raises(ValueError):
        ZImageClient("broker:9093", security_protocol="TLS")  # not a protocol Kafka knows


async def test_erase_sources_are_inline_bytes_or_uris(tmp_path: Path) -> None:
    image = tmp_path / "banner.png"
    image.write_bytes(b"\x89PNG bytes")
    inline = {"base64": base64.b64encode(b"\x89PNG bytes").decode()}
    assert await source_of(b"\x89PNG bytes") == inline
    assert await source_of(image) == inline
    assert await source_of(str(image)) == inline
    assert await source_of("s3://bucket/uploads/a.png") == {"uri": "s3://bucket/uploads/a.png"}
    request = erase_request(await source_of(image), "erase-1", ["en"], "classical")
    parsed = parse_request(json.dumps(request).encode(), 1 << 20)
    assert isinstance(parsed, EraseTextRequest) and parsed.params.engine == "classical"


# -- the results reader, against fake Kafka clients ---------------------------------------


class _FakeProducer:
    def __init__(self, kafka: _FakeKafka, **options: Any) -> None:
        self.options = options
        self.stopped = False
        kafka.producers.append(self)

    async def start(self) -> None:
        await asyncio.sleep(0)  # a real start yields: concurrent starters would race here

    async def stop(self) -> None:
        self.stopped = True

    async def send_and_wait(self, topic: str, value: bytes, **kwargs: Any) -> None:
        pass


class _FakeConsumer:
    def __init__(self, kafka: _FakeKafka, **options: Any) -> None:
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.stopped = False
        self.fail_start = kafka.fail_consumer_start
        kafka.consumers.append(self)

    async def start(self) -> None:
        if self.fail_start:
            raise ConnectionError("broker unreachable")

    async def stop(self) -> None:
        self.stopped = True

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0}

    def assign(self, partitions: list[TopicPartition]) -> None:
        pass

    async def seek_to_end(self, *partitions: TopicPartition) -> None:
        pass

    async def position(self, tp: TopicPartition) -> int:
        return 0

    async def getmany(self, timeout_ms: int) -> dict[TopicPartition, list[Any]]:
        item = await self.inbox.get()
        if isinstance(item, BaseException):
            raise item
        topic, key, value = item
        return {TopicPartition(topic, 0): [SimpleNamespace(key=key, value=value)]}


class _FakeKafka:
    def __init__(self) -> None:
        self.producers: list[_FakeProducer] = []
        self.consumers: list[_FakeConsumer] = []
        self.fail_consumer_start = False

    def answer(self, request_id: str, topic: str = "zimage.results") -> None:
        if topic == "zimage.results":
            event: dict[str, Any] = {
                "schema_version": 1,
                "request_id": request_id,
                "task": "generate",
                "status": "succeeded",
                "images": [],
                "timings_ms": {"queued": 0, "inference": 0, "total": 0},
            }
        else:
            event = {"schema_version": 1, "request_id": request_id, "step": 1, "total": 2}
        self.consumers[-1].inbox.put_nowait((topic, request_id.encode(), json.dumps(event)))


@pytest.fixture
def kafka(monkeypatch: pytest.MonkeyPatch) -> _FakeKafka:
    fake = _FakeKafka()
    monkeypatch.setattr(client_module, "AIOKafkaProducer", lambda **kw: _FakeProducer(fake, **kw))
    monkeypatch.setattr(client_module, "AIOKafkaConsumer", lambda **kw: _FakeConsumer(fake, **kw))
    return fake


def _client(**kwargs: Any) -> ZImageClient:
    return ZImageClient(settings=KafkaSettings(progress_topic="zimage.progress"), **kwargs)


async def test_a_progress_callback_that_raises_is_logged_and_calls_go_on(
    kafka: _FakeKafka,
) -> None:
    def broken(event: ProgressEvent) -> None:
        raise ValueError("callback bug")

    async with _client() as client:
        first = await client.submit(generate_request("x", "r1"), on_progress=broken)
        with capture_logs() as logs:
            kafka.answer("r1", "zimage.progress")
            kafka.answer("r1")
            assert (await first.result(5)).status == "succeeded"
        assert [e["request_id"] for e in logs if e["event"] == "progress_callback_failed"] == ["r1"]
        second = await client.submit(generate_request("y", "r2"))
        kafka.answer("r2")
        assert (await second.result(5)).request_id == "r2"
    assert len(kafka.consumers) == 1


async def test_a_failed_reader_fails_its_calls_and_the_next_call_starts_another(
    kafka: _FakeKafka,
) -> None:
    client = _client()
    waiting = await client.submit(generate_request("x", "r1"))
    with capture_logs() as logs:
        kafka.consumers[0].inbox.put_nowait(OSError("connection reset"))
        with pytest.raises(OSError, match="connection reset"):
            await waiting.result(5)
    assert any(e["event"] == "results_reader_failed" for e in logs)
    assert kafka.consumers[0].stopped
    again = await client.submit(generate_request("y", "r2"))
    kafka.answer("r2")
    assert (await again.result(5)).request_id == "r2"
    assert len(kafka.consumers) == 2
    await client.stop()  # the dead reader's error is not stop()'s
    assert kafka.consumers[1].stopped and kafka.producers[0].stopped


async def test_stop_closes_the_producer_when_the_consumer_fails_to_close(
    kafka: _FakeKafka,
) -> None:
    client = _client()
    await client.start_reader()

    async def refuse() -> None:
        raise ConnectionError("close failed")

    kafka.consumers[0].stop = refuse  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        await client.stop()
    assert kafka.producers[0].stopped


async def test_a_result_can_be_awaited_again_after_a_timeout(kafka: _FakeKafka) -> None:
    async with _client() as client:
        submission = await client.submit(generate_request("x", "r1"))
        with pytest.raises(ResultTimeout):
            await submission.result(0.01)
        kafka.answer("r1")
        assert (await submission.result(5)).request_id == "r1"
        assert client._waiting == {}
        with pytest.raises(ResultTimeout):
            await client.generate("x", request_id="r2", timeout_s=0.01)
        assert client._waiting == {}  # call() gave up: the reader forgets it
        given_up = await client.submit(generate_request("x", "r3"))
        given_up.cancel()
        assert client._waiting == {}
        with pytest.raises(asyncio.CancelledError):
            await given_up.result(5)


async def test_progress_ends_with_a_timeout_when_no_result_comes(kafka: _FakeKafka) -> None:
    async with _client(timeout_s=0.05) as client:
        submission = await client.submit(generate_request("x", "r1"))
        kafka.answer("r1", "zimage.progress")
        steps = []
        with pytest.raises(ResultTimeout):
            async for step in submission.progress():
                steps.append(step.step)
        assert steps == [1]


async def test_concurrent_first_calls_start_one_producer(kafka: _FakeKafka) -> None:
    client = _client()
    await asyncio.gather(*(client.publish(generate_request("x", f"r{i}")) for i in range(5)))
    await asyncio.gather(*(client.start_reader() for _ in range(5)))
    assert len(kafka.producers) == 1 and len(kafka.consumers) == 1
    await client.stop()


async def test_a_reader_that_cannot_connect_is_closed(kafka: _FakeKafka) -> None:
    kafka.fail_consumer_start = True
    async with _client() as client:
        with pytest.raises(ConnectionError):
            await client.start_reader()
        assert kafka.consumers[0].stopped


async def test_the_producer_takes_the_workers_request_size(kafka: _FakeKafka) -> None:
    async with ZImageClient(settings=KafkaSettings(max_message_bytes=10 << 20)) as client:
        await client.publish(generate_request("x", "r1"))
    assert kafka.producers[0].options["max_request_size"] == (10 << 20) + 64 * 1024


async def test_an_image_over_the_request_limit_is_refused_before_it_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * 3000)

    def unread(self: Path) -> bytes:
        raise AssertionError("read")

    monkeypatch.setattr(Path, "read_bytes", unread)
    with pytest.raises(ValueError, match="ZIMAGE_MAX_MESSAGE_BYTES"):
        await source_of(big, max_bytes=2048)
    with pytest.raises(ValueError, match="over the 2048-byte"):
        await source_of(b"\0" * 3000, max_bytes=2048)


def test_the_readmes_client_example_runs_as_written(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Client library", 1)[1]
    example = section.split("```python\n", 1)[1].split("```", 1)[0]
    compile(example, "README.md", "exec")  # no await outside a coroutine
    pytest.importorskip("ruff", reason="the names are checked with ruff (the dev extra)")
    (tmp_path / "example.py").write_text(example)
    lint = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--isolated", "--select", "F", "example.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert lint.returncode == 0, lint.stdout  # every name defined, every import used
