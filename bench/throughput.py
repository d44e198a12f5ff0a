"""Throughput of the worker against the seed's naive service, side by side in one run.

The same workload (generate requests of two sizes, one or two images, a share of exact
repeats) is published at once to a real Tansu broker and answered by

  (a) the naive service: one request at a time, read, generate, PNG-encode, store,
      publish, then the next; no batching, no overlap, no cache;
  (b) the worker: cache, micro-batching of compatible requests, decode/encode/store/
      publish overlapped with the next batch's inference.

Both run the miniature model on this machine's CPU with the same engine settings.
Prints images/s, their ratio, p50/p99 end-to-end latency (publish to result received),
and (b)'s device busy fraction: time inside model calls / wall time while saturated.

    .venv/bin/python bench/throughput.py [--requests 48] [--repeat-share 0.2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

# Run as a script, so this folder is on sys.path and _services imports directly.
from _services import Receiver, bench_settings, broker, percentile
from zimage_stream.broker import FETCH_MAX_WAIT_MS
from zimage_stream.client import generate_request
from zimage_stream.engine import BatchShape, GenerateJob, ImageEngine
from zimage_stream.imaging import encode_image
from zimage_stream.schemas import ImageRef, ResultEvent, parse_request
from zimage_stream.settings import Settings
from zimage_stream.storage import Storage
from zimage_stream.styles import style_prompt
from zimage_stream.testing import running_worker
from zimage_stream.topics import ensure_topics

SIZES = [(256, 256), (320, 256)]


def workload(requests: int, repeat_share: float, steps: int) -> list[dict[str, Any]]:
    return workload_of(requests, repeat_share, steps, SIZES, [1, 1, 2])


def workload_of(
    requests: int,
    repeat_share: float,
    steps: int,
    sizes: list[tuple[int, int]],
    image_counts: list[int],
    tag: str = "t",
) -> list[dict[str, Any]]:
    """``requests`` generate requests of the given sizes and image counts, a share of
    them exact repeats of an earlier one (seeded: the same list every run); ``tag``
    starts request ids and prompts, so workloads of one run share nothing."""
    rng = random.Random(11)
    items: list[dict[str, Any]] = []
    for index in range(requests):
        request_id = f"{tag}-{index}"
        if items and rng.random() < repeat_share:
            items.append({**rng.choice(items), "request_id": request_id})  # an exact repeat
            continue
        width, height = rng.choice(sizes)
        prompt, images = f"{tag}: studio photo of product {index}", rng.choice(image_counts)
        items.append(
            generate_request(prompt, request_id, None, width, height, images, index, steps)
        )
    return items


async def publish_all(settings: Settings, items: list[dict[str, Any]]) -> dict[str, float]:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, linger_ms=5)
    await producer.start()
    sent = {}
    try:
        for item in items:
            sent[item["request_id"]] = time.perf_counter()
            await producer.send(
                settings.kafka.requests_topic,
                json.dumps(item).encode(),
                key=item["request_id"].encode(),
            )
        await producer.flush()
    finally:
        await producer.stop()
    return sent


async def naive_service(settings: Settings, count: int, engine: ImageEngine) -> float:
    """Serve ``count`` requests one at a time; returns seconds inside model calls."""
    storage = Storage.from_settings(settings.storage)
    consumer = AIOKafkaConsumer(
        settings.kafka.requests_topic,
        bootstrap_servers=settings.kafka.bootstrap_servers,
        group_id=f"naive-{settings.kafka.group_id}",
        auto_offset_reset="earliest",
        fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
    )
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers)
    await consumer.start()
    await producer.start()
    busy, served = 0.0, 0
    try:
        while served < count:
            record = await consumer.getone()
            request = parse_request(record.value, settings.kafka.max_message_bytes)
            params = request.params
            arrived = record.timestamp / 1000
            started = time.perf_counter()
            prompt = style_prompt(params.prompt, params.style)
            job = GenerateJob(prompt, params.num_images, params.resolved_seed())
            shape = BatchShape(
                params.width, params.height, params.num_inference_steps, params.guidance_scale
            )
            images = engine.generate([job], shape)[0]  # blocking, as the naive service did
            busy += time.perf_counter() - started
            refs = []
            for image in images:
                stored = await storage.put_image(encode_image(image, "png"), "png")
                refs.append(
                    ImageRef(
                        uri=stored.uri,
                        width=image.width,
                        height=image.height,
                        content_type="image/png",
                        sha256=stored.sha256,
                        size_bytes=stored.size_bytes,
                    )
                )
            result = ResultEvent.build(
                request.request_id,
                request.task,
                None,
                model=engine.model_info,
                arrived_at=arrived,
                images=refs,
            )
            await producer.send_and_wait(
                settings.kafka.results_topic, result.to_bytes(), key=request.request_id.encode()
            )
            served += 1
    finally:
        await producer.stop()
        await consumer.stop()
    return busy


async def measure(
    name: str, settings: Settings, items: list[dict[str, Any]], serve: Any
) -> dict[str, Any]:
    receiver = Receiver(settings)
    await receiver.start()
    started = time.perf_counter()
    sent = await publish_all(settings, items)
    busy = await serve()
    await receiver.wait_for({item["request_id"] for item in items}, timeout_s=1800)
    wall = time.perf_counter() - started
    await receiver.stop()
    if busy is None:
        busy = 0.0
    latencies = [(receiver.arrived[rid][0] - sent[rid]) * 1000 for rid in sent]
    images = sum(len(receiver.arrived[rid][1]["images"]) for rid in sent)
    failed = [rid for rid in sent if receiver.arrived[rid][1]["status"] != "succeeded"]
    assert not failed, f"{name}: {len(failed)} requests failed"
    return {
        "name": name,
        "wall_s": wall,
        "images": images,
        "images_per_s": images / wall,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "busy": busy / wall,
    }


async def run(requests: int, repeat_share: float, steps: int) -> None:
    items = workload(requests, repeat_share, steps)
    with broker() as bootstrap:
        naive_settings = bench_settings(bootstrap, redis_url="")
        await ensure_topics(naive_settings.kafka, 3)
        engine = ImageEngine(naive_settings.engine)
        engine.load()
        engine.warm_up()
        naive = await measure(
            "naive (one at a time)",
            naive_settings,
            items,
            lambda: naive_service(naive_settings, len(items), engine),
        )
        worker_settings = bench_settings(
            bootstrap, redis_url="", batch_window_ms=30, max_batch_size=8
        )
        async with running_worker(worker_settings) as worker:
            busy_before = worker.engine_busy_s

            async def serve() -> None:
                return None

            result = await measure("worker (batched, overlapped)", worker_settings, items, serve)
            result["busy"] = (worker.engine_busy_s - busy_before) / result["wall_s"]
            batches = worker.stats["batches"]
    _report(items, naive, result, batches, steps)


def _report(items: list, naive: dict, worker: dict, batches: int, steps: int) -> None:
    repeats = len(items) - len({json.dumps(i["params"], sort_keys=True) for i in items})
    print(
        f"\n{len(items)} generate requests ({repeats} exact repeats, sizes 256x256 and "
        f"320x256, 1-2 images, {steps} steps), miniature model on this CPU, real broker"
    )
    print(f"{'':>30} {'images/s':>9} {'wall s':>8} {'p50 ms':>9} {'p99 ms':>9} {'busy':>6}")
    for row in (naive, worker):
        print(
            f"{row['name']:>30} {row['images_per_s']:>9.2f} {row['wall_s']:>8.1f} "
            f"{row['p50_ms']:>9.0f} {row['p99_ms']:>9.0f} {row['busy']:>6.1%}"
        )
    print(
        f"throughput ratio worker/naive: {worker['images_per_s'] / naive['images_per_s']:.2f}x; "
        f"total time {1 - worker['wall_s'] / naive['wall_s']:.0%} less; "
        f"worker batches: {batches}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--repeat-share", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    asyncio.run(run(args.requests, args.repeat_share, args.steps))


if __name__ == "__main__":
    main()
