"""Records other clients produce: every compression codec Kafka offers, and a record
aiokafka cannot decode. Neither may stop the stream."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiokafka import AIOKafkaProducer

from tests.integration.conftest import KafkaIO, generate
from tests.support.records import send_with_bad_checksum, send_with_raw_header_name
from zimage_stream.settings import Settings
from zimage_stream.testing import running_worker

CODECS = ["gzip", "snappy", "lz4", "zstd"]
#: produces one hand-made record: (producer, topic, partition, key, value) -> its offset
SendRecord = Callable[[AIOKafkaProducer, str, int, bytes, bytes], Awaitable[int]]


async def test_requests_in_every_compression_codec_are_answered(
    settings: Settings, kafka_io: KafkaIO
) -> None:
    async with running_worker(settings):
        for codec in CODECS:
            producer = AIOKafkaProducer(
                bootstrap_servers=settings.kafka.bootstrap_servers, compression_type=codec
            )
            await producer.start()
            try:
                request = generate(f"codec-{codec}", f"a mug packed with {codec}")
                await producer.send_and_wait(
                    settings.kafka.requests_topic,
                    json.dumps(request).encode(),
                    key=request["request_id"].encode(),
                )
            finally:
                await producer.stop()
        results = await kafka_io.results(len(CODECS))
    assert {r["request_id"] for r in results} == {f"codec-{c}" for c in CODECS}
    assert Counter(r["status"] for r in results) == {"succeeded": len(CODECS)}


@pytest.mark.parametrize(
    ("send_bad", "reason"),
    [
        pytest.param(send_with_raw_header_name, "UnicodeDecodeError", id="header-name"),
        pytest.param(send_with_bad_checksum, "CorruptRecordException", id="checksum"),
    ],
)
async def test_a_record_aiokafka_cannot_decode_is_dead_lettered_and_the_partition_moves_on(
    settings: Settings,
    kafka_io: KafkaIO,
    producer: AIOKafkaProducer,
    send_bad: SendRecord,
    reason: str,
) -> None:
    bad = json.dumps(generate("bad")).encode()
    # Read in one fetch with the records before and after it, when the worker starts.
    for request_id in ("before-0", "before-1"):
        await kafka_io.send(generate(request_id, request_id), partition=0)
    assert await send_bad(producer, settings.kafka.requests_topic, 0, b"bad", bad) == 2
    await kafka_io.send(generate("after-0", "after-0"), partition=0)
    async with running_worker(settings) as worker:
        await kafka_io.send(generate("after-1", "after-1"), partition=0)
        results = await kafka_io.results(5)
        dlq = await kafka_io.read(settings.kafka.dlq_topic, 1)
        committed = await _wait_committed(kafka_io, {0: 5})
    by_id = {r["request_id"]: r for r in results}
    assert len(results) == 5 and worker.stats["dead_letters"] == 1
    for request_id in ("before-0", "before-1", "after-0", "after-1"):
        assert by_id[request_id]["status"] == "succeeded"
    refused = by_id["bad"]  # its value names it
    assert (refused["status"], refused["error"]["code"]) == ("rejected", "invalid_request")
    assert f"cannot be decoded ({reason}" in refused["error"]["message"]
    # The original key and value (a header whose name is not UTF-8 is dropped).
    [dead] = dlq
    assert (dead.key, dead.value) == (b"bad", bad)
    assert dead.headers["source.offset"] == b"2" and dead.headers["source.partition"] == b"0"
    assert dead.headers["error.code"] == b"invalid_request"
    assert committed == {0: 5}


async def test_records_of_other_partitions_read_in_the_failed_fetch_are_not_lost(
    settings: Settings, kafka_io: KafkaIO, producer: AIOKafkaProducer
) -> None:
    """aiokafka's failed ``getmany`` may already have moved other partitions past records
    it then dropped: they are read again."""
    for partition in (1, 2):
        for i in range(3):
            request_id = f"p{partition}-{i}"
            await kafka_io.send(generate(request_id, request_id), partition=partition)
    topic = settings.kafka.requests_topic
    await send_with_raw_header_name(producer, topic, 0, b"k", b"not even json")
    await kafka_io.send(generate("p0-after", "p0-after"), partition=0)
    async with running_worker(settings):
        results = await kafka_io.results(8)
        committed = await _wait_committed(kafka_io, {0: 2, 1: 3, 2: 3})
    assert Counter(r["status"] for r in results) == {"succeeded": 7, "rejected": 1}
    assert len({r["request_id"] for r in results}) == 8  # None for the undecodable one
    assert committed == {0: 2, 1: 3, 2: 3}


@pytest.fixture
async def producer(settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
    """A producer for what ``KafkaIO.send`` does not send: hand-made batches."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers)
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


async def _wait_committed(kafka_io: KafkaIO, offsets: dict[int, int]) -> dict[int, int]:
    deadline = time.monotonic() + 20
    committed: dict[int, int] = {}
    while time.monotonic() < deadline and committed != offsets:
        committed = await kafka_io.committed()
    return committed
