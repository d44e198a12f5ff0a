"""Prometheus metrics and the worker's small HTTP endpoint: ``/metrics``, ``/healthz``,
``/readyz`` (``ZIMAGE_HTTP_PORT``; 0 picks a free port, -1 turns it off).

Counters and histograms are updated where things happen (results published, batches
run); gauges that describe the worker's state (cache hits, device busy fraction, consumer
lag, requests in flight) are read from it at scrape time. Each worker has its own
registry, so two workers in one process (tests) do not mix their series.
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

log = structlog.get_logger(__name__)


class WorkerState(Protocol):
    """What the scrape-time collector reads off a worker."""

    started_monotonic: float
    engine_busy_s: float
    stats: dict[str, int]

    def cache_counts(self) -> dict[str, int]: ...
    def consumer_lag(self) -> dict[int, int]: ...
    def in_flight(self) -> int: ...
    def undelivered(self) -> dict[str, int]: ...
    def engine_restarts(self) -> dict[str, int]: ...
    def engine_stats(self) -> dict[str, int]: ...


class WorkerMetrics:
    def __init__(self, state: WorkerState) -> None:
        self.registry = CollectorRegistry()
        self.results = Counter(
            "zimage_requests",
            "Requests answered (result events published), by task and status",
            ["task", "status"],
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
        self.registry.register(_StateCollector(state))

    def record_batch(self, requests: int, seconds: float) -> None:
        self.batch_size.observe(requests)
        self.inference_seconds.observe(seconds)

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
    def __init__(self, state: WorkerState) -> None:
        self._state = state

    def collect(self) -> Iterator[Any]:
        state = self._state
        cache = state.cache_counts()
        for name in ("hits", "misses"):
            family = CounterMetricFamily(f"zimage_cache_{name}", f"Result cache {name}")
            family.add_metric([], cache.get(name, 0))
            yield family
        dead = CounterMetricFamily("zimage_dlq_messages", "Messages dead-lettered")
        dead.add_metric([], state.stats.get("dead_letters", 0))
        yield dead
        uptime = max(1e-9, time.monotonic() - state.started_monotonic)
        busy = GaugeMetricFamily(
            "zimage_device_busy_fraction",
            "Share of the time since the worker started spent inside model calls",
        )
        busy.add_metric([], min(1.0, state.engine_busy_s / uptime))
        yield busy
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
        engine = state.engine_stats()
        for result, key in (("hit", "prompt_cache_hits"), ("miss", "prompt_cache_misses")):
            prompts.add_metric([result], engine.get(key, 0))
        yield prompts
        misses = CounterMetricFamily(
            "zimage_compile_misses",
            "Model calls run eager because no compiled graph covered their shape",
        )
        misses.add_metric([], engine.get("compile_misses", 0))
        yield misses


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
        except OSError as exc:
            raise RuntimeError(
                f"cannot serve /metrics, /healthz and /readyz on port {self._port}: {exc} "
                "(set ZIMAGE_HTTP_PORT to a free port, 0 for any, or -1 for none)"
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
