"""The Redis fast path with a real redis-server, the real broker and the real worker."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from redis.asyncio import Redis
from structlog.testing import capture_logs

from tests.integration.conftest import KafkaIO, generate, http_get, metric_value
from zimage_stream.cache import content_key
from zimage_stream.schemas import GenerateRequest, parse_request
from zimage_stream.settings import Settings
from zimage_stream.testing import RedisServer, running_worker
from zimage_stream.worker import Worker


def _lock_name(request: dict, worker: Worker) -> str:
    """The Redis key of the cache lock for this request's content."""
    parsed = parse_request(json.dumps(request).encode(), 1 << 20)
    assert isinstance(parsed, GenerateRequest)
    return f"zimage:v1:lock:{content_key(parsed, worker.engine.model_info)}"


def _uris(result: dict) -> list[str]:
    return [image["uri"] for image in result["images"]]


async def _results_for(kafka_io: KafkaIO, ids: set[str], timeout_s: float = 120) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        results = await kafka_io.results(1, timeout_s=timeout_s)
        by_id = {r["request_id"]: r for r in results}
        if set(by_id) >= ids:
            return by_id
        assert asyncio.get_running_loop().time() < deadline, f"missing {ids - set(by_id)}"
        await asyncio.sleep(0.2)


async def test_repeats_are_answered_from_redis(
    settings: Settings, kafka_io: KafkaIO, redis_server: RedisServer
) -> None:
    settings = settings.replace(redis_url=redis_server.url)
    async with running_worker(settings) as worker:
        await kafka_io.send(generate("first", style="festive", num_images=2))
        await _results_for(kafka_io, {"first"})
        await kafka_io.send(generate("repeat", style="festive", num_images=2))
        # The same id again, with other params: answered from the request-id store.
        with capture_logs() as logs:
            await kafka_io.send(generate("first", "a completely different prompt"))
            results = await kafka_io.results(3)
    # Same key, same partition: the two answers to "first" are in order.
    first, again = [r for r in results if r["request_id"] == "first"]
    (repeat,) = [r for r in results if r["request_id"] == "repeat"]
    assert first["cache_hit"] is False
    assert repeat["cache_hit"] is True and repeat["status"] == "succeeded"
    assert _uris(repeat) == _uris(first) and repeat["timings_ms"]["inference"] == 0
    assert again["cache_hit"] is True and _uris(again) == _uris(first)
    assert any(e["event"] == "request_id_reused_with_other_params" for e in logs)
    assert worker.stats["batches"] == 1  # the model ran once for all three
    assert worker.dedup.stats.hits == 2 and worker.dedup.stats.misses == 1
    assert len(worker.cache.stats.lookup_seconds) == 3


async def test_identical_requests_in_one_window_run_the_model_once(
    settings: Settings, kafka_io: KafkaIO, redis_server: RedisServer
) -> None:
    settings = settings.replace(redis_url=redis_server.url, batch_window_ms=1000)
    async with running_worker(settings) as worker:
        for request_id in ("twin-a", "twin-b", "twin-c"):
            await kafka_io.send(generate(request_id, "a brass desk lamp", seed=3))
        by_id = await _results_for(kafka_io, {"twin-a", "twin-b", "twin-c"})
    assert worker.stats["batch_requests"] == 1
    assert {r["status"] for r in by_id.values()} == {"succeeded"}
    assert len({tuple(_uris(r)) for r in by_id.values()}) == 1
    assert sorted(r["cache_hit"] for r in by_id.values()) == [False, True, True]


async def test_two_workers_compute_shared_content_once(
    settings: Settings, kafka_io: KafkaIO, redis_server: RedisServer
) -> None:
    shared = {"redis_url": redis_server.url, "batch_window_ms": 300}
    settings_a = settings.replace(**shared)
    settings_b = settings.replace(
        **shared,
        requests_topic=settings.kafka.requests_topic + "-b",
        group_id=settings.kafka.group_id + "-b",
    )
    io_b = KafkaIO(settings_b)
    await io_b.start()
    try:
        async with running_worker(settings_a) as a, running_worker(settings_b) as b:
            request = generate(
                "shared-a", "a linen cushion", width=512, height=512, num_inference_steps=8, seed=8
            )
            await asyncio.gather(
                kafka_io.send(request), io_b.send({**request, "request_id": "shared-b"})
            )
            by_id = await _results_for(kafka_io, {"shared-a", "shared-b"})
    finally:
        await io_b.stop()
    assert a.stats["batches"] + b.stats["batches"] == 1
    assert {r["status"] for r in by_id.values()} == {"succeeded"}
    assert _uris(by_id["shared-a"]) == _uris(by_id["shared-b"])


async def test_a_dead_lock_holder_is_taken_over(
    settings: Settings, kafka_io: KafkaIO, redis_server: RedisServer
) -> None:
    settings = settings.replace(redis_url=redis_server.url)
    request = generate("orphan", "a ceramic vase", seed=4)
    async with running_worker(settings) as worker:
        redis = Redis.from_url(redis_server.url)
        # Another worker took the content's lock and died: the lock expires in 1.5 s.
        await redis.set(_lock_name(request, worker), b"dead-worker", px=1500)
        await redis.aclose()
        started = asyncio.get_running_loop().time()
        await kafka_io.send(request)
        by_id = await _results_for(kafka_io, {"orphan"})
        waited = asyncio.get_running_loop().time() - started
    assert by_id["orphan"]["status"] == "succeeded"
    assert by_id["orphan"]["cache_hit"] is False
    assert waited >= 1.0 and worker.stats["batches"] == 1


async def test_every_request_is_answered_while_redis_is_down(
    settings: Settings, kafka_io: KafkaIO, redis_server: RedisServer
) -> None:
    settings = settings.replace(redis_url=redis_server.url, http_port=0)
    async with running_worker(settings) as worker:
        assert worker.http is not None
        port = worker.http.port
        await kafka_io.send(generate("before", "a wool scarf"))
        await _results_for(kafka_io, {"before"})
        redis_server.stop()
        for request_id, prompt in (
            ("down-1", "a wool scarf"),
            ("down-2", "a silk tie"),
            ("down-3", "a silk tie"),
        ):
            await kafka_io.send(generate(request_id, prompt))
        by_id = await _results_for(kafka_io, {"down-1", "down-2", "down-3"})
        # Still ready (it serves), but degraded; the failures are counted.
        status, body = await http_get(port, "/readyz")
        assert status == 200 and json.loads(body)["degraded"] is True
        _, metrics = await http_get(port, "/metrics")
        assert metric_value(metrics, "zimage_redis_errors_total") >= 1
        assert metric_value(metrics, "zimage_degraded") == 1
        redis_server.start()  # same port: the worker reconnects by itself
        await asyncio.sleep(1.5)  # past the cache's back-off
        await kafka_io.send(generate("after", "a leather belt"))
        await _results_for(kafka_io, {"after"})
        assert json.loads((await http_get(port, "/readyz"))[1])["degraded"] is False
        await kafka_io.send(generate("after-repeat", "a leather belt"))
        by_id = await _results_for(kafka_io, {"after-repeat"})
    assert all(r["status"] == "succeeded" for r in by_id.values())
    assert by_id["after-repeat"]["cache_hit"] is True


async def test_the_holder_keeps_its_lock_during_long_work(
    settings: Settings, kafka_io: KafkaIO, redis_server: RedisServer
) -> None:
    # A lock TTL far shorter than the inference: the keeper must extend it meanwhile.
    settings = settings.replace(redis_url=redis_server.url, cache_lock_ttl_s=0.6)
    request = {
        **generate(
            "long-held",
            "a wicker basket",
            width=1024,
            height=1024,
            num_images=2,
            num_inference_steps=8,
        ),
        "timeout_s": 120,  # long work, not a timeout, even on two busy cores
    }
    redis = Redis.from_url(redis_server.url)
    try:
        async with running_worker(settings) as worker:
            lock = _lock_name(request, worker)
            await kafka_io.send(request)
            seen = []
            while worker.stats["results"] == 0:
                seen.append(await redis.get(lock))
                await asyncio.sleep(0.1)
            await _results_for(kafka_io, {"long-held"})
            released = await redis.get(lock)
    finally:
        await redis.aclose()
    # Held from the first sample on (the send takes a moment), by one holder, to the end.
    first = next(i for i, value in enumerate(seen) if value is not None)
    held = seen[first:-1]
    assert len(held) >= 20 and None not in held and len(set(held)) == 1
    assert released is None


async def test_a_stopping_worker_releases_the_locks_of_work_it_never_started(
    settings: Settings, kafka_io: KafkaIO, redis_server: RedisServer
) -> None:
    settings = settings.replace(redis_url=redis_server.url, batch_window_ms=30_000)
    request = generate("never-run", "a copper kettle")
    redis = Redis.from_url(redis_server.url)
    try:
        async with running_worker(settings) as worker:
            lock = _lock_name(request, worker)
            await kafka_io.send(request)
            for _ in range(100):
                if await redis.get(lock) is not None:
                    break
                await asyncio.sleep(0.1)
            assert await redis.get(lock) is not None  # batched, waiting for its window
        assert await redis.get(lock) is None  # released at shutdown, not left to expire
        assert worker.stats["batches"] == 0 and await kafka_io.committed() == {}
    finally:
        await redis.aclose()


async def test_an_entry_whose_objects_are_gone_is_a_miss(
    settings: Settings, kafka_io: KafkaIO, redis_server: RedisServer
) -> None:
    settings = settings.replace(redis_url=redis_server.url)
    async with running_worker(settings) as worker:
        await kafka_io.send(generate("kept", "a bamboo tray", num_images=2))
        first = (await _results_for(kafka_io, {"kept"}))["kept"]
        # Someone cleaned the bucket: one of the two objects is gone.
        Path(first["images"][1]["uri"].removeprefix("file://")).unlink()
        await kafka_io.send(generate("after-cleanup", "a bamboo tray", num_images=2))
        again = (await _results_for(kafka_io, {"after-cleanup"}))["after-cleanup"]
    assert again["cache_hit"] is False and again["status"] == "succeeded"
    assert worker.stats["batches"] == 2 and worker.dedup.stats.stale == 1
    assert all(Path(ref["uri"].removeprefix("file://")).is_file() for ref in again["images"])
