"""The worker's HTTP endpoint: /healthz while loading, /readyz only once warm, and
/metrics series that move during a run."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable

import pytest

from tests.integration.conftest import KafkaIO, generate, metric_value
from tests.integration.conftest import http_get as get
from zimage_stream.engine.calls import Faults
from zimage_stream.engine_process import EngineProcess
from zimage_stream.settings import Settings, SettingsError
from zimage_stream.testing import running_worker
from zimage_stream.worker import Worker


async def _until(condition: Callable[[], bool], timeout_s: float = 60) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out waiting")


async def test_readyz_turns_ready_only_after_warm_up(settings: Settings) -> None:
    settings = settings.replace(http_port=0)
    # Warm-up runs 2 denoising steps: make each take a second, to look at it meanwhile.
    engine = EngineProcess(settings.engine, faults=Faults(step_sleep_s=1.0))
    worker = Worker(settings, engine=engine)
    run = asyncio.create_task(worker.run())
    try:
        await _until(lambda: worker.http is not None and worker.http._server is not None)
        assert worker.http is not None
        port = worker.http.port
        await _until(lambda: worker.engine.pid is not None)  # the engine process loads
        assert (await get(port, "/healthz"))[0] == 200  # alive while loading and warming up
        status, body = await get(port, "/readyz")
        assert status == 503 and json.loads(body)["ready"] is False
        assert json.loads(body)["model"] is None
        await asyncio.wait_for(worker.ready.wait(), timeout=120)
        status, body = await get(port, "/readyz")
        report = json.loads(body)
        assert status == 200 and report["ready"] is True and report["broker_connected"] is True
        assert report["model"]["model_id"] == "tiny" and report["model"]["warmup_s"] >= 2.0
        assert (await get(port, "/nothing"))[0] == 404
    finally:
        worker.stop()
        await asyncio.wait_for(run, timeout=60)


async def test_metrics_expose_the_named_series_and_they_move(
    settings: Settings, kafka_io: KafkaIO
) -> None:
    settings = settings.replace(http_port=0)
    async with running_worker(settings) as worker:
        assert worker.http is not None
        port = worker.http.port
        _, before = await get(port, "/metrics")
        for index in range(3):
            await kafka_io.send(generate(f"m-{index}", f"a stool {index}"))
        await kafka_io.results(3)
        await kafka_io.send(generate("m-repeat", "a stool 0"))  # same content: a cache hit
        await kafka_io.send(b"not json")  # dead-lettered
        await kafka_io.results(5)
        # Another seed: not a cached result, but the prompt's embedding is cached.
        await kafka_io.send(generate("m-seed", "a stool 0", seed=99))
        await kafka_io.results(6)
        await asyncio.sleep(0.2)
        status, after = await get(port, "/metrics")
        _, ready = await get(port, "/readyz")
    assert status == 200
    succeeded = 'zimage_requests_total{status="succeeded",task="generate"}'
    assert metric_value(after, succeeded) == 5
    assert metric_value(after, 'zimage_requests_total{status="rejected",task="unknown"}') == 1
    assert (
        metric_value(after, "zimage_cache_hits_total")
        >= 1
        > metric_value(before, "zimage_cache_hits_total")
    )
    assert metric_value(after, "zimage_cache_misses_total") >= 3
    assert metric_value(after, "zimage_dlq_messages_total") == 1
    assert metric_value(after, "zimage_batch_size_count") >= 1
    assert metric_value(after, "zimage_inference_seconds_sum") > 0
    assert metric_value(after, "zimage_queue_seconds_count") >= 3
    assert 0 < metric_value(after, "zimage_device_busy_fraction") <= 1
    assert metric_value(after, "zimage_device_busy_seconds_total") > 0
    # Publish to result, by task and cache hit; errors by code.
    assert (
        metric_value(
            after, 'zimage_result_latency_seconds_count{cache_hit="false",task="generate"}'
        )
        == 4
    )
    assert (
        metric_value(after, 'zimage_result_latency_seconds_count{cache_hit="true",task="generate"}')
        == 1
    )
    assert (
        metric_value(after, 'zimage_request_errors_total{code="invalid_json",task="unknown"}') == 1
    )
    assert metric_value(after, "zimage_redis_errors_total") == 0
    assert metric_value(after, "zimage_degraded") == 0
    assert metric_value(after, 'zimage_prompt_cache_total{result="hit"}') == 1
    assert metric_value(after, 'zimage_prompt_cache_total{result="miss"}') == 3
    assert metric_value(after, "zimage_compile_misses_total") == 0
    calls = json.loads(ready)["engine_calls"]
    assert calls["prompt_cache_hits"] == 1 and calls["device_busy_ms"] > 0
    lags = re.findall(r'^zimage_consumer_lag\{partition="(\d)"\} (\S+)$', after, re.M)
    assert lags and all(float(value) == 0 for _, value in lags)  # all answered
    assert metric_value(after, "zimage_in_flight") == 0


async def test_a_taken_port_is_a_clear_error(settings: Settings) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker = Worker(settings.replace(http_port=port))
        with pytest.raises(SettingsError, match=f"ZIMAGE_HTTP_PORT={port}: cannot serve"):
            await worker.run()
