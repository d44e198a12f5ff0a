"""A broker restart: the worker reconnects and carries on; nothing is lost or stuck.

The broker keeps its log in S3 (a private moto server) so that it survives the restart,
as Apache Kafka's log on disk would; the session's broker keeps everything in memory."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import boto3
import pytest

from tests.integration.conftest import KafkaIO, generate, wait_for_ids
from zimage_stream.broker import EmbeddedBroker, free_port
from zimage_stream.settings import Settings
from zimage_stream.testing import running_worker


@pytest.fixture
def durable_broker() -> Iterator[EmbeddedBroker]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    s3.start()
    endpoint = f"http://127.0.0.1:{port}"
    credentials = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **credentials).create_bucket(
        Bucket="tansu"
    )
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT": endpoint,
        "AWS_ALLOW_HTTP": "true",
    }
    broker = EmbeddedBroker(storage_engine="s3://tansu/", env=env)
    try:
        yield broker.start()
    finally:
        broker.stop()
        s3.stop()


async def test_the_worker_reconnects_after_a_broker_restart(
    settings: Settings, durable_broker: EmbeddedBroker
) -> None:
    settings = settings.replace(kafka_bootstrap_servers=durable_broker.bootstrap_servers)
    before, after = [f"before-{i}" for i in range(3)], [f"after-{i}" for i in range(3)]
    async with running_worker(settings) as worker:
        io = KafkaIO(settings)
        await io.start()
        for request_id in before:
            await io.send(generate(request_id, f"kettle {request_id}"))
        await wait_for_ids(io, set(before), timeout_s=120)
        await io.stop()

        durable_broker.stop()
        await asyncio.sleep(2)  # the broker is down: the worker's connections fail
        durable_broker.start()

        io = KafkaIO(settings)
        await io.start()
        try:
            for request_id in after:
                await io.send(generate(request_id, f"kettle {request_id}"))
            # Generous: on a 2-core machine about twice as slow as usual, with the other
            # tests running beside it, the last partition's answer came after over 180 s
            # (alone, the whole test takes about 140 s there).
            results = await wait_for_ids(io, set(before + after), timeout_s=360)
            deadline, committed = time.monotonic() + 60, 0
            while time.monotonic() < deadline and committed < 6:
                committed = sum((await io.committed()).values())
        finally:
            await io.stop()
        assert worker.stats["results"] >= 6
    answered = {r["request_id"] for r in results}
    assert answered == set(before + after)
    assert all(r["status"] == "succeeded" for r in results)
    assert committed == 6
