"""The worker: Kafka requests in, micro-batches through the engine, images stored, results out.

The stages overlap so the device never waits on I/O:

* **admit**: the fetch loop reads records and validates them; rejects and dead letters
  are answered at once, and every valid request goes its own way in its own task: the
  fast path (``dedup``) answers repeats from the cache and joins identical work in
  flight; the rest of ``generate`` is batched, and ``erase_text`` is erased off the loop;
* **engine loop**: whenever the device is free it takes the oldest ready batch and sends
  it to the engine process (``engine_process``), so heartbeats, fetching and cache hits
  go on during inference and a request that crashes or hangs the model takes only that
  process with it (``suspects`` decides what becomes of the requests inside);
* **finish**: each finished batch's images (encoded in the engine process) are stored,
  settled in the fast path and published by its own task while the next batch is
  already on the device. The consumer commits offsets up to the lowest record whose
  result is not acknowledged.

Errors become data at one boundary per path (``_route``, ``Generations.answer``,
``Erasures.answer``, ``Outbox.reject``): every request gets exactly one result event per
processing attempt, published and its record settled by the ``outbox``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import structlog
from structlog.contextvars import bound_contextvars

from .batcher import Batch, Batcher
from .cache import ResultCache
from .consumer import Delivery, RequestConsumer
from .dedup import Answer, Dedup
from .engine import JobResult
from .engine_process import EngineProcess
from .erasures import Erasures
from .errors import ZImageError, as_error
from .generations import Generations, Pending
from .logs import request_context
from .metrics import HttpEndpoint, WorkerMetrics
from .outbox import Outbox
from .preflight import check_services
from .producer import ResultProducer
from .progress import step_reporter
from .schemas import (
    FORCE_HEADER,
    EraseTextRequest,
    GenerateRequest,
    RequestParseError,
    parse_request,
)
from .settings import Settings
from .storage import Storage
from .styles import style_prompt
from .suspects import Attempts, Suspects, attempt_store
from .topics import ensure_topics

log = structlog.get_logger(__name__)


def _context(delivery: Delivery, request_id: str | None, task: str | None) -> dict[str, Any]:
    """What every log line about this request carries: id, task, trace id."""
    return request_context(request_id, task, delivery.headers)


def _forced(delivery: Delivery) -> bool:
    """A forced replay (``zimage-stream replay --force``): compute again, skip the cache."""
    return any(k == FORCE_HEADER and v == b"1" for k, v in delivery.headers)


class Worker:
    """Composes consumer, fast path, batcher, engine, storage and producer; ``run`` until
    ``stop``."""

    def __init__(
        self,
        settings: Settings,
        engine: EngineProcess | None = None,
        storage: Storage | None = None,
        cache: ResultCache | None = None,
    ) -> None:
        self._settings = settings
        self._engine = engine or EngineProcess(settings.engine, settings.ocr)
        self._storage = storage or Storage.from_settings(settings.storage)
        self.cache = cache or ResultCache.from_settings(settings.cache)
        self.dedup = Dedup(self.cache, self._storage, settings.cache.lock_ttl_s)
        batch = settings.batch
        self._batcher: Batcher[Pending] = Batcher(batch.window_ms / 1000, batch.max_batch_size)
        self._batch_added = asyncio.Event()
        self._stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self.attempts = Attempts(
            attempt_store(settings.cache.redis_url, settings.engine.attempts_file),
            settings.kafka.group_id,
        )
        #: counters a test or the bench can read
        self.stats = {"batches": 0, "batch_requests": 0, "results": 0, "dead_letters": 0}
        self.metrics = WorkerMetrics(self)
        self.outbox = Outbox(
            self._require_producer,
            self._require_consumer,
            lambda: self._engine.model_info,
            self.metrics,
            self.stats,
        )
        self.suspects = Suspects(
            self.attempts, settings.engine.poison_attempts, self.outbox.dead_letter
        )
        image_format = settings.storage.image_format
        self.generations = Generations(
            self._engine, self._storage, self.dedup, self.suspects, image_format
        )
        self.erasures = Erasures(
            self._engine,
            self._storage,
            self.dedup,
            self.suspects,
            settings.ocr,
            image_format,
            settings.batch.erase_pixels_in_flight,
            self.metrics,
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._finishing = asyncio.Semaphore(2)  # bounds decoded images held in memory
        self._batch_ids = itertools.count(1)
        self._consumer: RequestConsumer | None = None
        self._producer: ResultProducer | None = None
        self.http: HttpEndpoint | None = None
        if settings.http_port >= 0:
            self.http = HttpEndpoint(settings.http_port, self.metrics.routes(self._readiness))

    @property
    def engine(self) -> EngineProcess:
        return self._engine

    @property
    def engine_busy_s(self) -> float:
        """Seconds the device has spent on model calls since the worker started, by the
        engine process's own clock."""
        return self._engine.run_stats["device_busy_ms"] / 1000

    # -- what /metrics, /healthz and /readyz show -----------------------------------------

    def cache_counts(self) -> dict[str, int]:
        return {"hits": self.dedup.stats.hits, "misses": self.dedup.stats.misses}

    def consumer_lag(self) -> dict[int, int]:
        return self._consumer.lag() if self._consumer is not None else {}

    def in_flight(self) -> int:
        return self._consumer.in_flight if self._consumer is not None else 0

    def undelivered(self) -> dict[str, int]:
        return dict(self._producer.undelivered) if self._producer is not None else {}

    def engine_restarts(self) -> dict[str, int]:
        return dict(self._engine.restarts)

    def engine_stats(self) -> dict[str, int]:
        return dict(self._engine.run_stats)

    def redis_errors(self) -> int:
        return self.cache.stats.errors

    def storage_errors(self) -> dict[str, int]:
        return dict(self._storage.errors)

    def degraded(self) -> bool:
        return self.cache.degraded

    def _readiness(self) -> dict[str, Any]:
        """Ready once the model is loaded and warm and the group is joined; not while the
        engine process is started again. ``degraded`` while Redis fails: the worker still
        serves, without cross-worker dedup and with cache lookups missing."""
        report = self._engine.report.as_dict() if self._engine.loaded else None
        ready = self.ready.is_set() and self._engine.ready.is_set()
        ready = ready and not self._stopping.is_set()
        return {
            "ready": ready,
            "degraded": self.degraded(),
            "broker_connected": self._consumer is not None,
            "model": report,
            "engine_calls": self.engine_stats(),
        }

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the worker to stop: no new fetches; the batch on the device is finished."""
        self._stopping.set()
        self._batch_added.set()
        self.dedup.close()

    async def run(self) -> None:
        """Check the services, load and warm the model, join the group, and serve until
        ``stop()``. A service that cannot be reached raises ``ServiceUnreachable``."""
        if self.http is not None:
            await self.http.start()  # /healthz answers while the model loads
        try:
            await self._serve()
        finally:
            if self.http is not None:
                await self.http.stop()

    async def _serve(self) -> None:
        # Seconds, before the model's minutes: a wrong address fails here.
        await check_services(self._settings, self._storage)
        await self._load_engine()
        kafka = self._settings.kafka
        if kafka.create_topics:
            await ensure_topics(kafka, kafka.topic_partitions)
        async with AsyncExitStack() as stack:
            stack.push_async_callback(self._engine.stop)
            stack.push_async_callback(self.attempts.close)
            await stack.enter_async_context(self.cache)
            await stack.enter_async_context(self.dedup)
            self._producer = await stack.enter_async_context(ResultProducer(kafka))
            self._consumer = await stack.enter_async_context(
                RequestConsumer(kafka, flush=self._producer.flush)
            )
            self.ready.set()
            log.info("worker_ready", group=kafka.group_id, topic=kafka.requests_topic)
            engine_loop = asyncio.create_task(self._engine_loop(), name="engine-loop")
            try:
                await self._fetch_loop()
            finally:
                self.stop()
                await self._shut_down(engine_loop)

    async def _load_engine(self) -> None:
        try:
            await self._engine.start()
        except BaseException:
            await self._engine.stop()
            raise

    async def _shut_down(self, engine_loop: asyncio.Task[None]) -> None:
        """Finish the batch on the device and publish what is done, within the grace period.
        Batched requests that never ran are given up (their locks released, their followers
        told): they stay uncommitted and are read again by the next owner."""
        grace = self._settings.shutdown_grace_s
        deadline = time.monotonic() + grace
        await asyncio.wait([engine_loop], timeout=grace)
        for batch in self._batcher.drain():
            for pending in batch.items:
                await self.dedup.abandon(pending.content_key)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=max(0.0, deadline - time.monotonic()))
        late = [t for t in [engine_loop, *self._tasks] if not t.done()]
        for task in late:
            task.cancel()
        if late:
            log.warning("shutdown_grace_exceeded", cancelled=len(late), grace_s=grace)
            await asyncio.gather(*late, return_exceptions=True)
        fast_path = {"cache_hits": self.dedup.stats.hits, "followers": self.dedup.stats.followers}
        log.info("worker_stopped", **fast_path, **self.stats)

    # -- admit: fetch, validate, route -------------------------------------------------------

    async def _fetch_loop(self) -> None:
        consumer = self._require_consumer()
        limit = self._settings.batch.max_in_flight
        while not self._stopping.is_set():
            for delivery in await consumer.fetch(timeout_ms=100, max_in_flight=limit):
                self._admit(delivery)

    def _admit(self, delivery: Delivery) -> None:
        if delivery.error is not None:  # a record aiokafka could not decode
            self._spawn(self.outbox.reject(delivery, delivery.error))
            return
        try:
            request = parse_request(delivery.record.value, self._settings.kafka.max_message_bytes)
            caption_tokens = 0
            if isinstance(request, GenerateRequest):
                caption_tokens = self._check_caption(request)
        except RequestParseError as exc:
            self._spawn(self.outbox.reject(delivery, exc))
            return
        if isinstance(request, EraseTextRequest):
            self._spawn(self._erase(delivery, request))
            return
        model = self._engine.model_info
        self._spawn(self._route(Pending.admit(delivery, request, model, caption_tokens)))

    def _check_caption(self, request: GenerateRequest) -> int:
        """The prompt's caption length in tokens; one longer than the model takes is
        refused before it is batched."""
        params = request.params
        try:
            return self._engine.check_caption(style_prompt(params.prompt, params.style))
        except ZImageError as exc:
            raise RequestParseError(exc, request.request_id, request.task) from None

    async def _route(self, pending: Pending) -> None:
        """Answer from the cache or with identical work in flight, else batch it."""
        request = pending.request
        with bound_contextvars(**_context(pending.delivery, request.request_id, request.task)):
            try:
                claim = await self.dedup.claim(
                    request.request_id,
                    pending.content_key,
                    _forced(pending.delivery),
                    self._budget(request.timeout_s),
                )
            except Exception as exc:  # the boundary: a request is always answered
                log.exception("fast_path_failed")
                await self._publish_answer(pending, Answer(error=as_error(exc, "the cache")))
                return
            if claim.kind == "lead":
                self._enqueue(pending)
            elif claim.answer is not None:
                await self._publish_answer(pending, claim.answer)

    def _enqueue(self, pending: Pending) -> None:
        params = pending.request.params
        self._batcher.add(pending, pending.batch_key, params.num_images, time.monotonic())
        self._batch_added.set()

    # -- the engine loop -------------------------------------------------------------------

    async def _engine_loop(self) -> None:
        while (batch := await self._next_batch()) is not None:
            batch_id = f"b{next(self._batch_ids)}"
            with bound_contextvars(batch_id=batch_id):
                outcomes, started_at = await self._run_batch(batch)
            await self._finishing.acquire()
            self._spawn(
                self._finish_batch(batch, outcomes, started_at, batch_id), self._finishing.release
            )

    async def _next_batch(self) -> Batch[Pending] | None:
        while True:
            if self._stopping.is_set():
                return None  # batches not started stay uncommitted and are read again
            batch = self._batcher.take(time.monotonic())
            if batch is not None:
                return batch
            deadline = self._batcher.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            self._batch_added.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._batch_added.wait(), timeout)

    async def _run_batch(self, batch: Batch[Pending]) -> tuple[list[JobResult], float]:
        """Each request's images or error, and when the batch started (wall clock)."""
        items = batch.items
        shape = items[0].shape
        budgets = [self._budget(p.request.timeout_s) for p in items]
        progress = None
        if self._settings.kafka.progress_topic:
            request_ids = [p.request.request_id for p in items]
            loop = asyncio.get_running_loop()
            progress = step_reporter(self._require_producer(), request_ids, loop, self._spawn)

        started_wall, started = time.time(), time.perf_counter()
        try:
            outcomes = await self.generations.infer(items, budgets, progress)
        except Exception as exc:
            if not isinstance(exc, ZImageError):
                log.exception("inference_failed", request_ids=[p.request.request_id for p in items])
            outcomes = [JobResult(error=as_error(exc, "inference")) for _ in items]
        elapsed = time.perf_counter() - started
        self.metrics.record_batch(len(batch), elapsed)
        self.stats["batches"] += 1
        self.stats["batch_requests"] += len(batch)
        log.info(
            "batch_done",
            requests=len(batch),
            request_ids=[p.request.request_id for p in items],
            images=batch.images,
            width=shape.width,
            height=shape.height,
            seconds=round(elapsed, 3),
            failed=sum(o.error is not None for o in outcomes),
        )
        return outcomes, started_wall

    def _budget(self, timeout_s: float | None) -> float:
        """A request's inference budget: its ``timeout_s``, else the worker's default."""
        return timeout_s or self._settings.engine.inference_timeout_s

    # -- finish: store, settle, publish ----------------------------------------------------

    async def _finish_batch(
        self, batch: Batch[Pending], outcomes: list[JobResult], started_at: float, batch_id: str
    ) -> None:
        with bound_contextvars(batch_id=batch_id):
            await asyncio.gather(
                *(
                    self._answer_batch_item(pending, outcome, started_at)
                    for pending, outcome in zip(batch.items, outcomes, strict=True)
                )
            )
            log.info("batch_answered", requests=len(batch))

    async def _answer_batch_item(
        self, pending: Pending, outcome: JobResult, started_at: float
    ) -> None:
        request = pending.request
        with bound_contextvars(**_context(pending.delivery, request.request_id, request.task)):
            self.metrics.queue_seconds.observe(max(0.0, started_at - pending.arrived_at))
            result = await self.generations.answer(pending, outcome, started_at)
            await self.outbox.publish(pending.delivery, result)

    async def _publish_answer(self, pending: Pending, answer: Answer) -> None:
        await self.outbox.publish(pending.delivery, self.generations.recalled(pending, answer))

    # -- text erasure ------------------------------------------------------------------------

    async def _erase(self, delivery: Delivery, request: EraseTextRequest) -> None:
        with bound_contextvars(**_context(delivery, request.request_id, request.task)):
            budget = self._budget(request.timeout_s)
            result = await self.erasures.answer(delivery, request, budget, _forced(delivery))
            if result is None:
                return  # stopping: left uncommitted, read again by the next owner
            self.metrics.queue_seconds.observe(result.timings_ms.queued / 1000)
            await self.outbox.publish(delivery, result)

    # -- helpers -----------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[None], on_done: Callable[[], None] | None = None) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)

        def finished(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if on_done is not None:
                on_done()
            if not t.cancelled() and t.exception() is not None:
                log.error("task_failed", exc_info=t.exception())

        task.add_done_callback(finished)

    def _require_consumer(self) -> RequestConsumer:
        if self._consumer is None:
            raise RuntimeError("the worker is not running")
        return self._consumer

    def _require_producer(self) -> ResultProducer:
        if self._producer is None:
            raise RuntimeError("the worker is not running")
        return self._producer
