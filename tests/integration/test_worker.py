"""The stream spine end to end: real broker, real worker, miniature model, local storage."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from PIL import Image
from structlog.testing import capture_logs

from tests.integration.conftest import KafkaIO, generate
from zimage_stream.settings import Settings
from zimage_stream.testing import running_worker


def _path(uri: str) -> Path:
    assert uri.startswith("file://")
    return Path(uri.removeprefix("file://"))


async def test_mixed_requests_succeed_and_compatible_ones_share_calls(
    settings: Settings, kafka_io: KafkaIO
) -> None:
    settings = settings.replace(batch_window_ms=1500, max_batch_size=8)
    requests = [
        generate("small-1", num_images=2),
        generate("wide-1", "a desk lamp", width=320, height=256),
        generate("small-2", "a leather bag"),
        generate("wide-2", "a sneaker", width=320, height=256),
        generate("small-3", "a teapot", num_images=3),
        generate("wide-3", "a phone", width=320, height=256),
        # Its style text makes its caption longer than 32 tokens: a call of its own.
        generate("styled", "a leather bag", style="luxury_dark"),
    ]
    async with running_worker(settings) as worker:
        with capture_logs() as logs:
            for request in requests:
                await kafka_io.send(request)
            results = await kafka_io.results(len(requests))
    by_id = {r["request_id"]: r for r in results}
    assert set(by_id) == {r["request_id"] for r in requests}
    for request in requests:
        result, params = by_id[request["request_id"]], request["params"]
        assert result["status"] == "succeeded", result["error"]
        assert result["cache_hit"] is False and result["error"] is None
        assert len(result["images"]) == params["num_images"]
        assert result["model"]["id"] == "tiny" and result["model"]["device"] == "cpu"
        for ref in result["images"]:
            with Image.open(_path(ref["uri"])) as image:
                assert image.size == (params["width"], params["height"])
            assert (ref["width"], ref["height"]) == (params["width"], params["height"])
            assert ref["content_type"] == "image/png" and ref["sha256"] in ref["uri"]
            assert _path(ref["uri"]).stat().st_size == ref["size_bytes"]
    # Two sizes and two caption-length buckets, each within one window: three calls.
    batches = [e for e in logs if e["event"] == "batch_done"]
    assert sorted((b["width"], b["requests"]) for b in batches) == [(256, 1), (256, 3), (320, 3)]
    assert worker.stats["batches"] == 3


async def test_same_seed_gives_the_same_objects(settings: Settings, kafka_io: KafkaIO) -> None:
    async with running_worker(settings):
        await kafka_io.send(generate("seed-a", seed=1234, num_images=2))
        await kafka_io.results(1)
        await kafka_io.send(generate("seed-b", seed=1234, num_images=2))
        await kafka_io.results(2)
        await kafka_io.send(generate("seed-c", seed=4321, num_images=2))
        results = {r["request_id"]: r for r in await kafka_io.results(3)}
    sha = {rid: [i["sha256"] for i in r["images"]] for rid, r in results.items()}
    assert sha["seed-a"] == sha["seed-b"]
    assert [i["uri"] for i in results["seed-a"]["images"]] == [
        i["uri"] for i in results["seed-b"]["images"]
    ]
    assert sha["seed-a"][0] != sha["seed-a"][1]  # each candidate has its own seed
    assert set(sha["seed-c"]).isdisjoint(sha["seed-a"])


async def test_malformed_messages_are_answered_and_the_partition_moves_on(
    settings: Settings, kafka_io: KafkaIO
) -> None:
    bad_json = b'{"schema_version": 1, "request_id": "broken'
    invalid = generate("bad-width", width=1000)
    future = {**generate("future"), "schema_version": 9}
    erase = {
        "schema_version": 1,
        "request_id": "erase-1",
        "task": "erase_text",
        "params": {"source": {"uri": "s3://bucket/key.png"}},
    }
    async with running_worker(settings):
        await kafka_io.send(
            bad_json, key=b"k-broken", partition=0, headers=[("traceparent", b"00-abc-def-01")]
        )
        await kafka_io.send(invalid, partition=0)
        await kafka_io.send(future, partition=0)
        await kafka_io.send(erase, partition=0)
        await kafka_io.send(
            generate("good-after"), partition=0, headers=[("traceparent", b"00-trace-good-01")]
        )
        results = await kafka_io.results(5)
        dlq = await kafka_io.read(settings.kafka.dlq_topic, 3)
        committed = await _wait_committed(kafka_io, partition=0, offset=5)
    by_id = {r["request_id"]: r for r in results}
    assert by_id["good-after"]["status"] == "succeeded"
    assert (by_id["bad-width"]["status"], by_id["bad-width"]["error"]["code"]) == (
        "rejected",
        "invalid_request",
    )
    assert "multiple of 16" in by_id["bad-width"]["error"]["message"]
    assert by_id["future"]["error"]["code"] == "unsupported_schema_version"
    # An s3:// source on a worker with folder storage is not this worker's to read.
    assert by_id["erase-1"]["status"] == "rejected"
    assert by_id["erase-1"]["error"]["code"] == "source_forbidden"
    assert by_id[None]["error"]["code"] == "invalid_json" and by_id[None]["task"] is None
    # The DLQ holds the original bytes with the reason and the source position.
    dead = {e.headers["source.offset"]: e for e in dlq}
    assert dead[b"0"].value == bad_json and dead[b"0"].key == b"k-broken"
    assert dead[b"0"].headers["error.code"] == b"invalid_json"
    assert dead[b"0"].headers["source.topic"] == settings.kafka.requests_topic.encode()
    assert dead[b"0"].headers["source.partition"] == b"0"
    assert dead[b"1"].headers["error.code"] == b"invalid_request"
    assert dead[b"2"].headers["error.code"] == b"unsupported_schema_version"
    assert committed == 5
    # A trace header travels from the request to its result.
    result_events = await kafka_io.read(settings.kafka.results_topic, 5)
    good = next(e for e in result_events if e.key == b"good-after")
    assert good.headers.get("traceparent") == b"00-trace-good-01"


async def test_offsets_are_committed_after_results(settings: Settings, kafka_io: KafkaIO) -> None:
    async with running_worker(settings):
        for i in range(6):
            await kafka_io.send(generate(f"c-{i}", f"product {i}"))
        results = await kafka_io.results(6)
        assert Counter(r["status"] for r in results) == {"succeeded": 6}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            committed = await kafka_io.committed()
            if sum(committed.values()) == 6:
                break
        assert sum(committed.values()) == 6


async def _wait_committed(kafka_io: KafkaIO, partition: int, offset: int) -> int | None:
    deadline = time.monotonic() + 20
    value = None
    while time.monotonic() < deadline:
        value = (await kafka_io.committed()).get(partition)
        if value == offset:
            break
    return value
