"""Prometheus metrics and the worker's small HTTP endpoint: ``/metrics``, ``/healthz``,
``/readyz`` (``ZIMAGE_HTTP_PORT``; 0 picks a free port, -1 turns it off).

Counters and histograms are updated where things happen (results published, batches
run, erasures done); the series that describe the worker's state (cache hits, Redis and
storage errors, consumer lag, requests in flight) are read from it at scrape time. Each
worker has its own registry, so two workers in one process (tests) do not mix their series.

Everything a dashboard rates is a counter or a histogram: device busy time is
``zimage_device_busy_seconds_total`` (its ``rate`` is the busy share over the window),
not only a lifetime average.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .errors import ERROR_CODES
from .settings import SettingsError

#: the tasks results are counted by ("unknown": a record too broken to name one)
TASKS = ("generate", "erase_text", "unknown")

log = structlog.get_logger(__name__)


#: publish-to-result seconds: cache hits take milliseconds, generations seconds to minutes
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


class WorkerState(Protocol):
    """What the scrape-time collector reads off a worker."""

    stats: dict[str, int]

    def cache_counts(self) -> dict[str, int]: ...
    def consumer_lag(self) -> dict[int, int]: ...
    def in_flight(self) -> int: ...
    def undelivered(self) -> dict[str, int]: ...
    def engine_restarts(self) -> dict[str, int]: ...
    def engine_stats(self) -> dict[str, int]: ...
    def redis_errors(self) -> int: ...
    def storage_errors(self) -> dict[str, int]: ...
    def degraded(self) -> bool: ...


class WorkerMetrics:
    def __init__(self, state: WorkerState) -> None:
        self.registry = CollectorRegistry()
        self.started_monotonic = time.monotonic()
        self.results = Counter(
            "zimage_requests",
            "Requests answered (result events published), by task and status",
            ["task", "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "zimage_request_errors",
            "Results published with an error, by task and error code",
            ["task", "code"],
            registry=self.registry,
        )
        # Every series exists from the start at 0: a series born at 1 has no increase,
        # and an alert on the first poison request or out-of-memory would never fire.
        for task in TASKS:
            for code in ERROR_CODES:
                self.errors.labels(task, code)
        self.result_latency = Histogram(
            "zimage_result_latency_seconds",
            "Seconds from a request's publication (its record's timestamp) to its result's",
            ["task", "cache_hit"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.erase_seconds = Histogram(
            "zimage_erase_seconds",
            "Seconds one erase_text request spent in the engine process, by engine",
            ["engine"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120),
            registry=self.registry,
        )
        self.erase_source_seconds = Histogram(
            "zimage_erase_source_seconds",
            "Seconds reading an erase_text request's source image",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "zimage_batch_size",
            "Requests per pipeline batch",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64),
            registry=self.registry,
        )
        self.inference_seconds = Histogram(
            "zimage_inference_seconds",
            "Seconds a batch spent in the model",
            buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120),
            registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "zimage_queue_seconds",
            "Seconds from a request's arrival to the start of its inference",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.registry.register(_StateCollector(state, self))

    def record_batch(self, requests: int, seconds: float) -> None:
        """A generate batch took ``seconds``, from sending its call to its answer (the
        device's own busy time comes from the engine process: ``engine_stats``)."""
        self.batch_size.observe(requests)
        self.inference_seconds.observe(seconds)

    def record_erasure(self, engine: str, seconds: float) -> None:
        """An erasure took ``seconds`` in the engine process, by engine."""
        self.erase_seconds.labels(engine).observe(seconds)

    def record_result(
        self,
        task: str | None,
        status: str,
        code: str | None,
        cache_hit: bool,
        latency_s: float | None,
    ) -> None:
        """A result event was published, ``latency_s`` after its request was (None when
        the request's record carries no timestamp)."""
        task = task or "unknown"
        self.results.labels(task, status).inc()
        if code is not None:
            self.errors.labels(task, code).inc()
        if latency_s is not None:
            latency = self.result_latency.labels(task, str(cache_hit).lower())
            latency.observe(max(0.0, latency_s))  # a producer's clock may run ahead of ours

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def routes(self, readiness: Callable[[], dict[str, Any]]) -> dict[str, Route]:
        """``/metrics``; ``/healthz`` (alive while the process serves); ``/readyz``: 200
        when ``readiness()`` says ``ready``, else 503, with its document as the body."""

        def ready() -> tuple[int, str, bytes]:
            document = readiness()
            return json_response(200 if document["ready"] else 503, document)

        return {
            "/metrics": lambda: (200, CONTENT_TYPE_LATEST, self.exposition()),
            "/healthz": lambda: json_response(200, {"alive": True}),
            "/readyz": ready,
        }


class _StateCollector(Collector):
    def __init__(self, state: WorkerState, metrics: WorkerMetrics) -> None:
        self._state, self._metrics = state, metrics

    def collect(self) -> Iterator[Any]:
        state = self._state
        engine = state.engine_stats()
        cache = state.cache_counts()
        for name in ("hits", "misses"):
            family = CounterMetricFamily(f"zimage_cache_{name}", f"Result cache {name}")
            family.add_metric([], cache.get(name, 0))
            yield family
        dead = CounterMetricFamily("zimage_dlq_messages", "Messages dead-lettered")
        dead.add_metric([], state.stats.get("dead_letters", 0))
        yield dead
        yield from self._device(engine)
        yield from self._dependencies()
        lag = GaugeMetricFamily(
            "zimage_consumer_lag", "Records not yet answered, per partition", labels=["partition"]
        )
        for partition, records in sorted(state.consumer_lag().items()):
            lag.add_metric([str(partition)], records)
        yield lag
        in_flight = GaugeMetricFamily("zimage_in_flight", "Records read and not yet answered")
        in_flight.add_metric([], state.in_flight())
        yield in_flight
        undelivered = CounterMetricFamily(
            "zimage_undelivered",
            "Results and dead letters given up after their send budget (records settled without)",
            labels=["kind"],
        )
        for kind in ("result", "dead_letter"):
            undelivered.add_metric([kind], state.undelivered().get(kind, 0))
        yield undelivered
        restarts = CounterMetricFamily(
            "zimage_engine_restarts",
            "Engine processes started again: it crashed, or was killed for hanging",
            labels=["reason"],
        )
        for reason in ("crashed", "hung"):
            restarts.add_metric([reason], state.engine_restarts().get(reason, 0))
        yield restarts
        prompts = CounterMetricFamily(
            "zimage_prompt_cache",
            "Caption embeddings taken from the engine's prompt cache (hit) or encoded (miss)",
            labels=["result"],
        )
        for result, key in (("hit", "prompt_cache_hits"), ("miss", "prompt_cache_misses")):
            prompts.add_metric([result], engine.get(key, 0))
        yield prompts
        misses = CounterMetricFamily(
            "zimage_compile_misses",
            "Model calls run eager because no compiled graph covered their shape",
        )
        misses.add_metric([], engine.get("compile_misses", 0))
        yield misses

    def _device(self, engine: dict[str, int]) -> Iterator[Any]:
        # The engine process's own clock (CUDA events on a GPU): generate calls and
        # diffusion erasures, not the time their answers wait to be encoded or sent.
        busy_s = engine.get("device_busy_ms", 0) / 1000
        seconds = CounterMetricFamily(
            "zimage_device_busy_seconds", "Seconds the device spent on model calls"
        )
        seconds.add_metric([], busy_s)
        yield seconds
        uptime = max(1e-9, time.monotonic() - self._metrics.started_monotonic)
        fraction = GaugeMetricFamily(
            "zimage_device_busy_fraction",
            "Share of the time since the worker started the device spent on model calls",
        )
        fraction.add_metric([], min(1.0, busy_s / uptime))
        yield fraction

    def _dependencies(self) -> Iterator[Any]:
        state = self._state
        redis = CounterMetricFamily(
            "zimage_redis_errors", "Redis calls that failed or took longer than REDIS_TIMEOUT_MS"
        )
        redis.add_metric([], state.redis_errors())
        yield redis
        storage = CounterMetricFamily(
            "zimage_storage_errors",
            "Object storage calls that failed (each failed write attempt, each failed read)",
            labels=["operation"],
        )
        errors = state.storage_errors()
        for operation in ("write", "read"):
            storage.add_metric([operation], errors.get(operation, 0))
        yield storage
        degraded = GaugeMetricFamily(
            "zimage_degraded", "1 while the cache steps aside because Redis fails, else 0"
        )
        degraded.add_metric([], int(state.degraded()))
        yield degraded


Route = Callable[[], tuple[int, str, bytes]]


class HttpEndpoint:
    """A minimal HTTP/1.1 server for GET routes (no framework: three routes, no body).

    It holds at most ``max_connections`` at a time and closes any beyond them at once, so
    that idle or slow clients cannot take the worker's file handles; each read of a
    request waits at most ``read_timeout_s``.
    """

    def __init__(
        self,
        port: int,
        routes: dict[str, Route],
        host: str = "0.0.0.0",
        *,
        max_connections: int = 32,
        read_timeout_s: float = 5.0,
    ) -> None:
        self._port, self._host, self._routes = port, host, routes
        self._max_connections, self._read_timeout_s = max_connections, read_timeout_s
        self._connections = 0
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, self._host, self._port)
        except OSError as exc:  # a setting the operator must change: one line, exit 2
            raise SettingsError(
                f"ZIMAGE_HTTP_PORT={self._port}: cannot serve /metrics, /healthz and /readyz"
                f" there ({exc.strerror or exc}); set a free port, 0 for any, or -1 for none"
            ) from exc
        log.info("http_endpoint_listening", port=self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._connections >= self._max_connections:
            writer.close()
            return
        self._connections += 1
        try:
            await self._answer(reader, writer)
        finally:
            self._connections -= 1

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        timeout = self._read_timeout_s
        try:
            line = await asyncio.wait_for(reader.readline(), timeout)
            while (await asyncio.wait_for(reader.readline(), timeout)) not in (b"\r\n", b""):
                pass  # headers are not needed
            parts = line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else ""
            route = self._routes.get(path) if parts and parts[0] == "GET" else None
            if route is None:
                status, content_type, body = 404, "text/plain", b"not found\n"
            else:
                status, content_type, body = route()
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}.get(status, "")
            head = (
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


def json_response(status: int, document: dict[str, Any]) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(document).encode()
