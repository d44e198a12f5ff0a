"""Sending results and dead letters: passing failures are retried within a budget,
permanent ones are not, and a send that is given up is counted, never left hanging."""

from __future__ import annotations

import time
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError
from structlog.testing import capture_logs

from zimage_stream.errors import InvalidJsonError
from zimage_stream.producer import TRUNCATED_HEADER, ResultProducer
from zimage_stream.schemas import ModelInfo, ResultEvent
from zimage_stream.settings import KafkaSettings

MODEL = ModelInfo(id="tiny", revision=None, device="cpu", dtype="float32")


class _Broker:
    """Stands in for aiokafka's producer: fails the first ``failures`` sends with ``error``."""

    def __init__(self, error: Exception, failures: int) -> None:
        self.error, self.failures, self.calls = error, failures, 0
        self.sent: list[dict[str, Any]] = []

    async def send_and_wait(self, topic: str, **record: Any) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        self.sent.append({"topic": topic, **record})


def _producer(broker: _Broker, budget_s: float) -> ResultProducer:
    producer = ResultProducer(KafkaSettings(), send_budget_s=budget_s)
    producer._producer = broker  # type: ignore[assignment]
    return producer


def _result() -> ResultEvent:
    return ResultEvent.build("r1", "generate", InvalidJsonError("x"), model=MODEL, arrived_at=0)


async def test_a_passing_failure_is_retried_until_it_goes_through() -> None:
    broker = _Broker(KafkaConnectionError("broker restarting"), failures=2)
    producer = _producer(broker, budget_s=30)
    assert await producer.publish_result(_result(), None)
    assert broker.calls == 3 and broker.sent[0]["key"] == b"r1"
    assert producer.undelivered == {}


async def test_a_permanent_failure_is_given_up_at_once_and_counted() -> None:
    broker = _Broker(MessageSizeTooLargeError(), failures=99)
    producer = _producer(broker, budget_s=30)
    with capture_logs() as logs:
        delivered = await producer.dead_letter(b"x" * 10, b"k", ("req", 0, 7), "invalid_json", "m")
    assert not delivered and broker.calls == 1
    assert producer.undelivered == {"dead_letter": 1}
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["send_given_up"]


@pytest.mark.timeout(30)
async def test_a_passing_failure_is_given_up_when_its_budget_is_spent() -> None:
    broker = _Broker(KafkaConnectionError("broker gone"), failures=99)
    producer = _producer(broker, budget_s=1.0)
    started = time.monotonic()
    assert not await producer.publish_result(_result(), None)
    assert broker.calls > 1 and time.monotonic() - started <= 1.0
    assert producer.undelivered == {"result": 1}


async def test_a_record_larger_than_the_worker_takes_is_dead_lettered_cut_and_marked() -> None:
    broker = _Broker(KafkaConnectionError("unused"), failures=0)
    producer = ResultProducer(KafkaSettings(max_message_bytes=1024), send_budget_s=1)
    producer._producer = broker  # type: ignore[assignment]
    original = b"[" * 5000
    delivered = await producer.dead_letter(
        original, b"k", ("req", 2, 9), "invalid_request", "too large", [("trace", b"t")]
    )
    assert delivered
    (sent,) = broker.sent
    assert sent["value"] == original[:1024]
    headers = dict(sent["headers"])
    assert headers[TRUNCATED_HEADER] == b"5000"
    assert headers["source.offset"] == b"9" and headers["trace"] == b"t"


async def test_a_record_within_the_limit_is_dead_lettered_unchanged() -> None:
    broker = _Broker(KafkaConnectionError("unused"), failures=0)
    producer = _producer(broker, budget_s=1)
    assert await producer.dead_letter(b"{", b"k", ("req", 0, 1), "invalid_json", "m")
    (sent,) = broker.sent
    assert sent["value"] == b"{" and TRUNCATED_HEADER not in dict(sent["headers"])
