"""Records other clients produce: every compression codec Kafka offers, and a record
aiokafka cannot decode. Neither may stop the stream."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from aiokafka import AIOKafkaProducer

from tests.integration.conftest import KafkaIO, generate
from zimage_stream.settings import Settings
from zimage_stream.testing import running_worker

CODECS = ["gzip", "snappy", "lz4", "zstd"]


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


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.replace(topic_partitions=1)
