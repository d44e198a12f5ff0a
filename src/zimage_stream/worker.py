"""The worker: Kafka requests in, micro-batches through the engine, images stored, results out.

Three stages overlap so the device never waits on I/O:

* the fetch loop reads records, validates them and adds them to the batcher
  (rejects and dead letters are answered at once, off the batch path);
* the engine loop takes the oldest ready batch whenever the device is free and runs it
  in the engine thread, so heartbeats and fetching continue during inference;
* each finished batch is encoded, stored and published by its own task while the next
  batch is already on the device; offsets are committed after the results are acked.

Errors become data at one boundary (``_answer_batch`` / ``_reject``): every request gets
exactly one result event per processing attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog
import torch
from PIL import Image
from structlog.contextvars import bound_contextvars

from .batcher import Batch, Batcher
from .consumer import Delivery, RequestConsumer
from .engine import BatchShape, GenerateJob, ImageEngine
from .errors import InternalError, ModelUnavailableError, OutOfMemoryError, ZImageError
from .imaging import CONTENT_TYPES, encode_image
from .producer import ResultProducer
from .schemas import (
    ErrorInfo,
    GenerateRequest,
    ImageRef,
    RequestParseError,
    ResultEvent,
    Timings,
    parse_request,
)
from .settings import Settings
from .storage import Storage
from .styles import style_prompt
from .topics import ensure_topics

log = structlog.get_logger(__name__)

_PASSED_HEADERS = ("traceparent",)


@dataclass(eq=False)
class Pending:
    """A validated generate request waiting for, or in, a batch."""

    delivery: Delivery
    request: GenerateRequest
    job: GenerateJob
    arrived_at: float  # wall-clock seconds: submitted_at, else the broker's timestamp


@dataclass
class BatchOutcome:
    """What one pipeline call produced: each request's images, or the error for all."""

    images: list[list[Image.Image]] | None
    error: ZImageError | None
    started_at: float
    inference_s: float


class Worker:
    """Composes consumer, batcher, engine, storage and producer; ``run`` until ``stop``."""

    def __init__(
        self,
        settings: Settings,
        engine: ImageEngine | None = None,
        storage: Storage | None = None,
    ) -> None:
        self._settings = settings
        self._engine = engine or ImageEngine(settings.engine)
        self._storage = storage or Storage.from_settings(settings.storage)
        batch = settings.batch
        self._batcher: Batcher[Pending] = Batcher(batch.window_ms / 1000, batch.max_batch_size)
        self._batch_added = asyncio.Event()
        self._stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self._engine_thread = ThreadPoolExecutor(1, thread_name_prefix="zimage-engine")
        self._encode_pool = ThreadPoolExecutor(2, thread_name_prefix="zimage-encode")
        self._tasks: set[asyncio.Task[None]] = set()
        self._finishing = asyncio.Semaphore(2)  # bounds decoded images held in memory
        self._commit_lock = asyncio.Lock()
        self._batch_ids = itertools.count(1)
        self._consumer: RequestConsumer | None = None
        self._producer: ResultProducer | None = None
        #: counters a test or the bench can read
        self.stats = {"batches": 0, "batch_requests": 0, "results": 0, "dead_letters": 0}
        self.engine_busy_s = 0.0

    @property
    def engine(self) -> ImageEngine:
        return self._engine

    def stop(self) -> None:
        """Ask the worker to stop: no new fetches; the batch on the device is finished."""
        self._stopping.set()
        self._batch_added.set()

    async def run(self) -> None:
        """Load and warm the model, join the group, and serve until ``stop()``."""
        await self._load_engine()
        kafka = self._settings.kafka
        if kafka.create_topics:
            await ensure_topics(kafka, kafka.topic_partitions)
        async with AsyncExitStack() as stack:
            stack.callback(self._engine_thread.shutdown, wait=False, cancel_futures=True)
            stack.callback(self._encode_pool.shutdown, wait=False, cancel_futures=True)
            self._producer = await stack.enter_async_context(ResultProducer(kafka))
            self._consumer = await stack.enter_async_context(RequestConsumer(kafka))
            self.ready.set()
            log.info("worker_ready", group=kafka.group_id, topic=kafka.requests_topic)
            engine_loop = asyncio.create_task(self._engine_loop(), name="engine-loop")
            try:
                await self._fetch_loop()
            finally:
                self.stop()
                await self._shut_down(engine_loop)

    async def _load_engine(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._engine_thread, self._engine.load)
        if self._settings.engine.warmup:
            await loop.run_in_executor(self._engine_thread, self._engine.warm_up)

    async def _shut_down(self, engine_loop: asyncio.Task[None]) -> None:
        """Finish the batch on the device and publish what is done, within the grace period."""
        grace = self._settings.shutdown_grace_s
        deadline = time.monotonic() + grace
        await asyncio.wait([engine_loop], timeout=grace)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=max(0.0, deadline - time.monotonic()))
        late = [t for t in [engine_loop, *self._tasks] if not t.done()]
        for task in late:
            task.cancel()
        if late:
            log.warning("shutdown_grace_exceeded", cancelled=len(late), grace_s=grace)
            await asyncio.gather(*late, return_exceptions=True)
        await self._commit()
        log.info("worker_stopped", **self.stats)

    # -- stage 1: fetch ------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        consumer = self._require_consumer()
        limit = self._settings.batch.max_in_flight
        while not self._stopping.is_set():
            room = max(1, limit - consumer.in_flight)
            for delivery in await consumer.fetch(timeout_ms=100, max_records=room):
                self._admit(delivery)
            # Backpressure: stop fetching above the mark, but keep polling to stay in the group.
            if consumer.in_flight >= limit:
                consumer.pause()
            elif consumer.in_flight <= limit // 2:
                consumer.resume()

    def _admit(self, delivery: Delivery) -> None:
        try:
            request = parse_request(delivery.record.value, self._settings.kafka.max_message_bytes)
        except RequestParseError as exc:
            self._spawn(self._reject(delivery, exc))
            return
        if not isinstance(request, GenerateRequest):
            error = ModelUnavailableError("erase_text is not available in this worker yet")
            self._spawn(self._answer_one(delivery, request.request_id, request.task, error))
            return
        params = request.params
        job = GenerateJob(
            prompt=style_prompt(params.prompt, params.style),
            num_images=params.num_images,
            seed=params.resolved_seed(),
        )
        arrived = (
            request.submitted_at.timestamp()
            if request.submitted_at
            else delivery.record.timestamp / 1000
        )
        key = (
            "generate",
            params.width,
            params.height,
            params.num_inference_steps,
            params.guidance_scale,
        )
        pending = Pending(delivery, request, job, arrived)
        self._batcher.add(pending, key, params.num_images, time.monotonic())
        self._batch_added.set()

    # -- stage 2: the device -------------------------------------------------------------

    async def _engine_loop(self) -> None:
        while (batch := await self._next_batch()) is not None:
            batch_id = f"b{next(self._batch_ids)}"
            with bound_contextvars(batch_id=batch_id):
                outcome = await self._run_batch(batch)
            await self._finishing.acquire()
            self._spawn(self._finish_batch(batch, outcome, batch_id), self._finishing.release)

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

    async def _run_batch(self, batch: Batch[Pending]) -> BatchOutcome:
        first = batch.items[0].request.params
        shape = BatchShape(
            first.width, first.height, first.num_inference_steps, first.guidance_scale
        )
        jobs = [p.job for p in batch.items]
        started_wall, started = time.time(), time.perf_counter()
        loop = asyncio.get_running_loop()
        images: list[list[Image.Image]] | None = None
        error: ZImageError | None = None
        try:
            images = await loop.run_in_executor(
                self._engine_thread, self._engine.generate, jobs, shape
            )
        except torch.OutOfMemoryError as exc:
            self._engine.free_memory()
            error = OutOfMemoryError(f"out of device memory for {batch.images} images: {exc}")
        except ZImageError as exc:
            error = exc
        except Exception as exc:
            log.exception("inference_failed")
            error = InternalError(f"inference failed: {exc!r}")
        elapsed = time.perf_counter() - started
        self.engine_busy_s += elapsed
        self.stats["batches"] += 1
        self.stats["batch_requests"] += len(batch)
        log.info(
            "batch_done",
            requests=len(batch),
            images=batch.images,
            width=shape.width,
            height=shape.height,
            seconds=round(elapsed, 3),
            ok=error is None,
        )
        return BatchOutcome(images, error, started_wall, elapsed)

    # -- stage 3: encode, store, publish, commit -----------------------------------------

    async def _finish_batch(
        self, batch: Batch[Pending], outcome: BatchOutcome, batch_id: str
    ) -> None:
        with bound_contextvars(batch_id=batch_id):
            answers = [
                self._answer_generate(
                    p, outcome, None if outcome.images is None else outcome.images[i]
                )
                for i, p in enumerate(batch.items)
            ]
            await asyncio.gather(*answers)
            log.info("batch_answered", requests=len(batch))
            await self._commit()

    async def _answer_generate(
        self, pending: Pending, outcome: BatchOutcome, images: list[Image.Image] | None
    ) -> None:
        request = pending.request
        with bound_contextvars(request_id=request.request_id):
            error, refs = outcome.error, []
            if images is not None:
                try:
                    refs = await self._store_images(images)
                except ZImageError as exc:
                    error = exc
            result = self._result(
                request.request_id,
                request.task,
                error,
                pending.arrived_at,
                images=refs,
                started_at=outcome.started_at,
                inference_s=outcome.inference_s,
            )
            await self._publish(pending.delivery, result)

    async def _store_images(self, images: list[Image.Image]) -> list[ImageRef]:
        image_format = self._settings.storage.image_format
        loop = asyncio.get_running_loop()

        async def store_one(image: Image.Image) -> ImageRef:
            data = await loop.run_in_executor(self._encode_pool, encode_image, image, image_format)
            stored = await self._storage.put_image(data, image_format)
            return ImageRef(
                uri=stored.uri,
                width=image.width,
                height=image.height,
                content_type=CONTENT_TYPES[image_format],
                sha256=stored.sha256,
                size_bytes=stored.size_bytes,
            )

        return list(await asyncio.gather(*(store_one(image) for image in images)))

    async def _reject(self, delivery: Delivery, exc: RequestParseError) -> None:
        """Dead-letter a message that is not a valid request, and answer it when possible."""
        producer = self._require_producer()
        record = delivery.record
        await producer.dead_letter(
            record.value,
            record.key,
            delivery.source,
            exc.error.code,
            exc.error.message,
            delivery.headers,
        )
        self.stats["dead_letters"] += 1
        await self._answer_one(delivery, exc.request_id, exc.task, exc.error)

    async def _answer_one(
        self, delivery: Delivery, request_id: str | None, task: str | None, error: ZImageError
    ) -> None:
        arrived = delivery.record.timestamp / 1000
        with bound_contextvars(request_id=request_id):
            log.info("request_refused", code=error.code, reason=error.message)
            await self._publish(delivery, self._result(request_id, task, error, arrived))
        await self._commit()

    def _result(
        self,
        request_id: str | None,
        task: str | None,
        error: ZImageError | None,
        arrived_at: float,
        images: list[ImageRef] | None = None,
        started_at: float | None = None,
        inference_s: float = 0.0,
    ) -> ResultEvent:
        now = time.time()
        queued = (started_at if started_at is not None else now) - arrived_at
        return ResultEvent(
            request_id=request_id,
            task=task,
            status="succeeded" if error is None else error.status,  # type: ignore[arg-type]
            images=images or [],
            error=None if error is None else ErrorInfo(**error.to_dict()),  # type: ignore[arg-type]
            model=self._engine.model_info,
            timings_ms=Timings(
                queued=round(max(0.0, queued) * 1000, 1),
                inference=round(inference_s * 1000, 1),
                total=round(max(0.0, now - arrived_at) * 1000, 1),
            ),
            completed_at=datetime.fromtimestamp(now, UTC),
        )

    async def _publish(self, delivery: Delivery, result: ResultEvent) -> None:
        """Publish and mark the offset answered; on failure leave it for redelivery."""
        producer = self._require_producer()
        headers = [(k, v) for k, v in delivery.headers if k in _PASSED_HEADERS]
        for attempt in range(1, 6):
            try:
                await producer.publish_result(result, delivery.record.key, headers)
                break
            except Exception as exc:
                log.warning("publish_failed", attempt=attempt, error=repr(exc))
                await asyncio.sleep(min(2.0**attempt * 0.1, 5.0))
        else:
            log.error("result_not_published", note="offset left uncommitted for redelivery")
            return
        self._require_consumer().done(delivery)
        self.stats["results"] += 1

    async def _commit(self) -> None:
        if self._consumer is None:
            return
        async with self._commit_lock:
            await self._consumer.commit()

    # -- helpers -------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[None], on_done: Callable[[], None] | None = None) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)

        def finished(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if on_done is not None:
                on_done()
            if not t.cancelled() and t.exception() is not None:
                log.error("task_failed", error=repr(t.exception()))

        task.add_done_callback(finished)

    def _require_consumer(self) -> RequestConsumer:
        if self._consumer is None:
            raise RuntimeError("the worker is not running")
        return self._consumer

    def _require_producer(self) -> ResultProducer:
        if self._producer is None:
            raise RuntimeError("the worker is not running")
        return self._producer
