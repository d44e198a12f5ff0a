"""Cache-hit latency and hit rate over a real broker and a real Redis (loopback).

Publishes a workload with a known share of repeats (same params, new request ids) to a
worker running the miniature model, and measures publish → result-received latency for
cache hits and misses, plus the hit rate. Prints one table.

With ``--saturate N``, N distinct heavier requests are published just before the
workload, so the engine process is busy for the whole of it; the table then says how
many of them were still unanswered when the workload's last result arrived.

    .venv/bin/python bench/cache_latency.py [--requests 400] [--repeat-share 0.8]
    .venv/bin/python bench/cache_latency.py --repeat-share 1.0 --requests 300 --saturate 120
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

from aiokafka import AIOKafkaProducer

# Run as a script, so this folder is on sys.path and _services imports directly.
from _services import (
    Receiver,
    bench_settings,
    broker,
    percentile,
    redis_server,
)
from zimage_stream.client import generate_request
from zimage_stream.testing import running_worker


def _request(request_id: str, product: int, size: int = 256, steps: int = 2) -> dict:
    return generate_request(
        f"product photo {product}", request_id, width=size, height=size, num_images=1, steps=steps
    )


async def run(requests: int, repeat_share: float, warm: int, rate: float, saturate: int) -> None:
    with broker() as bootstrap, redis_server() as redis_url:
        settings = bench_settings(bootstrap, redis_url=redis_url, batch_window_ms=20)
        async with running_worker(settings):
            receiver = Receiver(settings)
            await receiver.start()
            producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
            await producer.start()
            sent: dict[str, float] = {}

            async def send(request: dict) -> None:
                sent[request["request_id"]] = time.perf_counter()
                await producer.send_and_wait(
                    settings.kafka.requests_topic,
                    json.dumps(request).encode(),
                    key=request["request_id"].encode(),
                )

            # 1. Warm the cache: `warm` distinct products, computed once each.
            for i in range(warm):
                await send(_request(f"warm-{i}", i))
            await receiver.wait_for({f"warm-{i}" for i in range(warm)})
            # 2. Saturate the device: heavier distinct requests, published at once.
            flood = {f"flood-{i}" for i in range(saturate)}
            for i in range(saturate):
                await send(_request(f"flood-{i}", 10_000 + i, size=512, steps=8))
            # 3. The workload: a known share of repeats of warm products, the rest new.
            rng = random.Random(7)
            workload = []
            for i in range(requests):
                repeat = rng.random() < repeat_share
                product = rng.randrange(warm) if repeat else warm + i
                workload.append((_request(f"load-{i}", product), repeat))
            for request, _ in workload:
                await send(request)
                await asyncio.sleep(1 / rate)
            await receiver.wait_for({r["request_id"] for r, _ in workload})
            busy_until = {r for r in flood if r not in receiver.arrived}
            await receiver.wait_for(flood)
            await producer.stop()
            await receiver.stop()
    _report(workload, sent, receiver.arrived, repeat_share)
    if saturate:
        print(
            f"device saturated: {saturate} requests of 512x512 in 8 steps published before "
            f"the workload; {len(busy_until)} of them still unanswered when its last "
            "result arrived"
        )


def _report(workload: list, sent: dict, arrived: dict, repeat_share: float) -> None:
    hits, misses = [], []
    for request, _ in workload:
        rid = request["request_id"]
        received, result = arrived[rid]
        assert result["status"] == "succeeded", result
        (hits if result["cache_hit"] else misses).append((received - sent[rid]) * 1000)
    expected = sum(1 for _, repeat in workload if repeat)
    print(
        f"\nworkload: {len(workload)} requests, {expected} repeats "
        f"(share asked {repeat_share:.0%}), real Tansu broker + redis-server on loopback"
    )
    print(f"{'':>22} {'n':>5} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for name, values in (("cache hits", hits), ("misses (model runs)", misses)):
        print(
            f"{name:>22} {len(values):>5} {percentile(values, 50):>8.1f} "
            f"{percentile(values, 95):>8.1f} {percentile(values, 99):>8.1f} "
            f"{max(values, default=float('nan')):>8.1f}"
        )
    print(
        f"hit rate: {len(hits) / len(workload):.1%} (repeats in the workload: "
        f"{expected / len(workload):.1%})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--repeat-share", type=float, default=0.8)
    parser.add_argument("--warm", type=int, default=20, help="distinct products cached first")
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second")
    parser.add_argument(
        "--saturate", type=int, default=0, help="heavier requests that keep the device busy"
    )
    args = parser.parse_args()
    asyncio.run(run(args.requests, args.repeat_share, args.warm, args.rate, args.saturate))


if __name__ == "__main__":
    main()
