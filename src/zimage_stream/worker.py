"""The worker: Kafka requests in, micro-batches through the engine, images stored, results out.

The stages overlap so the device never waits on I/O:

* the fetch loop reads records and validates them; rejects and dead letters are answered
  at once, and every valid request is *routed* by its own task: a repeat is answered from
  the cache, identical content already in flight waits for it, the rest is batched;
* the engine loop takes the oldest ready batch whenever the device is free and runs it
  in the engine thread, so heartbeats, fetching and cache hits continue during inference;
* each finished batch is encoded, stored, remembered in the cache and published by its
  own task while the next batch is already on the device;
* the committer commits offsets up to the lowest record whose result is not acknowledged.

Errors become data at one boundary per path (``_answer_batch_item``, ``_reject``,
``_answer_one``): every request gets exactly one result event per processing attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST
from structlog.contextvars import bound_contextvars

from .batcher import Batch, Batcher
from .cache import CacheEntry, ResultCache, content_key, erase_content_key
from .consumer import Delivery, RequestConsumer
from .engine import BatchShape, GenerateJob, ImageEngine
from .engine.inpaint import DiffusionInpainter
from .eraser import TextEraser
from .errors import InternalError, ZImageError
from .imaging import CONTENT_TYPES, encode_image
from .inflight import InFlight
from .metrics import HttpEndpoint, WorkerMetrics, json_response
from .ocr import make_detector
from .producer import ResultProducer
from .replay import FORCE_HEADER, REPLAY_HEADER
from .runner import JobOutcome, RunStats, run_batch
from .schemas import (
    EraseTextRequest,
    ErrorInfo,
    GenerateRequest,
    ImageRef,
    ModelInfo,
    ProgressEvent,
    Provenance,
    RequestParseError,
    ResultEvent,
    TextRegion,
    Timings,
    parse_request,
)
from .settings import Settings
from .sources import read_source
from .storage import Storage
from .styles import style_prompt
from .topics import ensure_topics

log = structlog.get_logger(__name__)

_PASSED_HEADERS = ("traceparent", REPLAY_HEADER)
PROGRESS_INTERVAL_S = 0.25


def _provenance(pending: Pending) -> Provenance:
    params = pending.request.params
    return Provenance(
        seed=pending.job.seed,
        num_inference_steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale,
    )


def _forced(delivery: Delivery) -> bool:
    """A forced replay (``zimage-stream replay --force``): compute again, skip the cache."""
    return any(k == FORCE_HEADER and v == b"1" for k, v in delivery.headers)


#: what produces ``erase_text`` images with the classical engine
CLASSICAL_MODEL = ModelInfo(
    id="classical:rapidocr+opencv-telea", revision=None, device="cpu", dtype="uint8"
)


@dataclass(eq=False)
class Pending:
    """A validated generate request on its way to a result."""

    delivery: Delivery
    request: GenerateRequest
    job: GenerateJob
    content_key: str
    arrived_at: float  # wall-clock seconds: submitted_at, else the broker's timestamp


@dataclass
class BatchOutcome:
    """What a batch produced: each request's images or error (``runner.run_batch``)."""

    jobs: list[JobOutcome]
    started_at: float


@dataclass
class Answer:
    """How a request was answered, to be shared with the requests that followed it."""

    error: ZImageError | None
    entry: CacheEntry | None


class Worker:
    """Composes consumer, cache, batcher, engine, storage and producer; ``run`` until ``stop``."""

    def __init__(
        self,
        settings: Settings,
        engine: ImageEngine | None = None,
        storage: Storage | None = None,
        cache: ResultCache | None = None,
    ) -> None:
        self._settings = settings
        self._engine = engine or ImageEngine(settings.engine)
        self._storage = storage or Storage.from_settings(settings.storage)
        self.cache = cache or ResultCache.create(
            settings.redis_url,
            settings.cache_ttl_s,
            settings.request_id_ttl_s,
            timeout_s=settings.redis_timeout_ms / 1000,
        )
        batch = settings.batch
        self._batcher: Batcher[Pending] = Batcher(batch.window_ms / 1000, batch.max_batch_size)
        self._inflight: InFlight[Pending] = InFlight()
        self._locked: set[str] = set()  # content keys whose cache lock this worker holds
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._batch_added = asyncio.Event()
        self._commit_wanted = asyncio.Event()
        self._stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self._engine_thread = ThreadPoolExecutor(1, thread_name_prefix="zimage-engine")
        self._encode_pool = ThreadPoolExecutor(2, thread_name_prefix="zimage-encode")
        self._erase_pool = ThreadPoolExecutor(1, thread_name_prefix="zimage-erase")
        self._eraser: TextEraser | None = None
        self._erasing: dict[str, asyncio.Future[CacheEntry]] = {}  # content key -> result
        self._tasks: set[asyncio.Task[None]] = set()
        self._finishing = asyncio.Semaphore(2)  # bounds decoded images held in memory
        self._commit_lock = asyncio.Lock()
        self._batch_ids = itertools.count(1)
        self._consumer: RequestConsumer | None = None
        self._producer: ResultProducer | None = None
        #: counters a test or the bench can read
        self.stats = {
            "batches": 0,
            "batch_requests": 0,
            "results": 0,
            "dead_letters": 0,
            "followers": 0,
        }
        self.engine_busy_s = 0.0
        self.run_stats = RunStats()  # timeouts and out-of-memory splits
        self.started_monotonic = time.monotonic()
        self.metrics = WorkerMetrics(self)
        self.http: HttpEndpoint | None = None
        if settings.http_port >= 0:
            self.http = HttpEndpoint(
                settings.http_port,
                {"/metrics": self._metrics, "/healthz": self._healthz, "/readyz": self._readyz},
            )

    @property
    def engine(self) -> ImageEngine:
        return self._engine

    # -- what /metrics, /healthz and /readyz show -----------------------------------------

    def cache_counts(self) -> dict[str, int]:
        return {"hits": self.cache.stats.hits, "misses": self.cache.stats.misses}

    def consumer_lag(self) -> dict[int, int]:
        return self._consumer.lag() if self._consumer is not None else {}

    def in_flight(self) -> int:
        return self._consumer.in_flight if self._consumer is not None else 0

    def _metrics(self) -> tuple[int, str, bytes]:
        return 200, CONTENT_TYPE_LATEST, self.metrics.exposition()

    def _healthz(self) -> tuple[int, str, bytes]:
        return json_response(200, {"alive": True})

    def _readyz(self) -> tuple[int, str, bytes]:
        """Ready once the model is loaded and warm and the group is joined."""
        report = self._engine.report.as_dict() if self._engine.loaded else None
        ready = self.ready.is_set() and not self._stopping.is_set()
        body = {"ready": ready, "broker_connected": self._consumer is not None, "model": report}
        return json_response(200 if ready else 503, body)

    def stop(self) -> None:
        """Ask the worker to stop: no new fetches; the batch on the device is finished."""
        self._stopping.set()
        self._batch_added.set()
        self._commit_wanted.set()

    async def run(self) -> None:
        """Load and warm the model, join the group, and serve until ``stop()``."""
        if self.http is not None:
            await self.http.start()  # /healthz answers while the model loads
        try:
            await self._serve()
        finally:
            if self.http is not None:
                await self.http.stop()

    async def _serve(self) -> None:
        await self._load_engine()
        kafka = self._settings.kafka
        if kafka.create_topics:
            await ensure_topics(kafka, kafka.topic_partitions)
        async with AsyncExitStack() as stack:
            stack.callback(self._engine_thread.shutdown, wait=False, cancel_futures=True)
            stack.callback(self._encode_pool.shutdown, wait=False, cancel_futures=True)
            stack.callback(self._erase_pool.shutdown, wait=False, cancel_futures=True)
            await stack.enter_async_context(self.cache)
            self._producer = await stack.enter_async_context(ResultProducer(kafka))
            self._consumer = await stack.enter_async_context(RequestConsumer(kafka))
            self.ready.set()
            log.info("worker_ready", group=kafka.group_id, topic=kafka.requests_topic)
            loops = [
                asyncio.create_task(self._engine_loop(), name="engine-loop"),
                asyncio.create_task(self._committer(), name="committer"),
                asyncio.create_task(self._lock_keeper(), name="lock-keeper"),
            ]
            try:
                await self._fetch_loop()
            finally:
                self.stop()
                await self._shut_down(loops)

    async def _load_engine(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._engine_thread, self._engine.load)
        if self._settings.engine.warmup:
            await loop.run_in_executor(self._engine_thread, self._engine.warm_up)

    async def _shut_down(self, loops: list[asyncio.Task[None]]) -> None:
        """Finish the batch on the device and publish what is done, within the grace period."""
        grace = self._settings.shutdown_grace_s
        deadline = time.monotonic() + grace
        await asyncio.wait(loops, timeout=grace)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=max(0.0, deadline - time.monotonic()))
        late = [t for t in [*loops, *self._tasks] if not t.done()]
        for task in late:
            task.cancel()
        if late:
            log.warning("shutdown_grace_exceeded", cancelled=len(late), grace_s=grace)
            await asyncio.gather(*late, return_exceptions=True)
        await self._release_unstarted()
        await self._commit()
        log.info("worker_stopped", cache_hits=self.cache.stats.hits, **self.stats)

    async def _release_unstarted(self) -> None:
        """Give up the locks of batched requests that never ran, so no one waits for them."""
        for batch in self._batcher.drain():
            for pending in batch.items:
                await self.cache.unlock(pending.content_key, self._owner)
                self._locked.discard(pending.content_key)

    # -- stage 1: fetch and route --------------------------------------------------------

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
        if isinstance(request, EraseTextRequest):
            self._spawn(self._erase(delivery, request))
            return
        self._spawn(self._route(self._pending(delivery, request)))

    def _pending(self, delivery: Delivery, request: GenerateRequest) -> Pending:
        params = request.params
        job = GenerateJob(
            prompt=style_prompt(params.prompt, params.style),
            num_images=params.num_images,
            seed=params.resolved_seed(),
        )
        submitted = request.submitted_at
        arrived = submitted.timestamp() if submitted else delivery.record.timestamp / 1000
        key = content_key(request, self._engine.model_info)
        return Pending(delivery, request, job, key, arrived)

    async def _route(self, pending: Pending) -> None:
        """Answer from the cache, or join identical work in flight, or batch it."""
        key = pending.content_key
        forced = _forced(pending.delivery)
        with bound_contextvars(request_id=pending.request.request_id):
            entry = None if forced else await self._cached(pending.request.request_id, key)
            if entry is not None:
                await self._answer_from(pending, entry, remember=False)
                return
            if not self._inflight.lead(key):
                self.stats["followers"] += 1
                self._inflight.follow(key, pending)
                return
            if not await self.cache.try_lock(key, self._owner, self._settings.cache_lock_ttl_s):
                await self._follow_other_worker(pending)
                return
            self._locked.add(key)
            # The result may have landed between the lookup and the lock (another worker
            # finished just then): look once more before computing it again.
            landed = None if forced else await self.cache.peek(key)
            if landed is not None and await self._objects_exist(landed):
                await self._answer_from(pending, landed, remember=True)
                return
            self._enqueue(pending)

    async def _cached(self, request_id: str, key: str) -> CacheEntry | None:
        """A cache entry whose objects are all still in storage, else None (a miss)."""
        stats = self.cache.stats
        entry = await self.cache.find(request_id, key)
        if entry is not None and not await self._objects_exist(entry):
            stats.stale += 1
            log.warning("cache_entry_objects_missing", content_key=key)
            entry = None
        if entry is None:
            stats.misses += 1
        else:
            stats.hits += 1
        return entry

    async def _objects_exist(self, entry: CacheEntry) -> bool:
        async def exists(uri: str) -> bool:
            try:
                return await self._storage.exists(uri)
            except Exception:  # another storage's URI, or storage down: not usable here
                return False

        return all(await asyncio.gather(*(exists(image.uri) for image in entry.images)))

    async def _follow_other_worker(self, pending: Pending) -> None:
        """Another worker holds this content's lock: wait for its result, or take over."""
        key, ttl = pending.content_key, self._settings.cache_lock_ttl_s
        log.info("waiting_for_other_worker", content_key=key)
        while not self._stopping.is_set():
            await asyncio.sleep(0.05)
            entry = await self.cache.peek(key)
            if entry is not None and await self._objects_exist(entry):
                await self._answer_from(pending, entry, remember=True)
                return
            if await self.cache.try_lock(key, self._owner, ttl):  # its holder is gone
                log.info("took_over_content", content_key=key)
                self._locked.add(key)
                self._enqueue(pending)
                return
        # Stopping: the request stays uncommitted and is read again by the next owner.

    def _enqueue(self, pending: Pending) -> None:
        params = pending.request.params
        shape = (
            "generate",
            params.width,
            params.height,
            params.num_inference_steps,
            params.guidance_scale,
        )
        self._batcher.add(pending, shape, params.num_images, time.monotonic())
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
        default_budget = self._settings.inference_timeout_s
        budgets = [p.request.timeout_s or default_budget for p in batch.items]
        started_wall, started = time.time(), time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            outcomes = await loop.run_in_executor(
                self._engine_thread,
                run_batch,
                self._engine,
                jobs,
                shape,
                budgets,
                self.run_stats,
                self._progress_reporter(batch, loop),
            )
        except ZImageError as exc:
            outcomes = [JobOutcome(error=exc) for _ in jobs]
        except Exception as exc:
            log.exception("inference_failed")
            failed = InternalError(f"inference failed: {exc!r}")
            outcomes = [JobOutcome(error=failed) for _ in jobs]
        elapsed = time.perf_counter() - started
        self.metrics.batch_size.observe(len(batch))
        self.metrics.inference_seconds.observe(elapsed)
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
            failed=sum(o.error is not None for o in outcomes),
        )
        return BatchOutcome(outcomes, started_wall)

    def _progress_reporter(
        self, batch: Batch[Pending], loop: asyncio.AbstractEventLoop
    ) -> Callable[[list[int], int, int], None] | None:
        """Step progress for ``ZIMAGE_PROGRESS_TOPIC``, throttled to one event per
        ``PROGRESS_INTERVAL_S`` per call (the first and the last step always go)."""
        if not self._settings.progress_topic:
            return None
        request_ids = [p.request.request_id for p in batch.items]
        last = [0.0]

        def report(jobs: list[int], step: int, total: int) -> None:  # on the engine thread
            now = time.monotonic()
            if step not in (1, total) and now - last[0] < PROGRESS_INTERVAL_S:
                return
            last[0] = now
            events = [
                ProgressEvent(request_id=request_ids[i], step=step, total=total) for i in jobs
            ]
            loop.call_soon_threadsafe(self._spawn, self._publish_progress(events))

        return report

    async def _publish_progress(self, events: list[ProgressEvent]) -> None:
        producer = self._require_producer()
        try:
            await asyncio.gather(*(producer.publish_progress(event) for event in events))
        except Exception as exc:  # progress is best effort
            log.warning("progress_not_published", error=repr(exc))

    # -- stage 3: store, remember, publish -----------------------------------------------

    async def _finish_batch(
        self, batch: Batch[Pending], outcome: BatchOutcome, batch_id: str
    ) -> None:
        with bound_contextvars(batch_id=batch_id):
            await asyncio.gather(
                *(
                    self._answer_batch_item(p, outcome, outcome.jobs[i])
                    for i, p in enumerate(batch.items)
                )
            )
            log.info("batch_answered", requests=len(batch))

    async def _answer_batch_item(
        self, pending: Pending, outcome: BatchOutcome, job: JobOutcome
    ) -> None:
        request = pending.request
        with bound_contextvars(request_id=request.request_id):
            answer = Answer(job.error, None)
            refs: list[ImageRef] = []
            if job.images is not None:
                try:
                    refs = await self._store_images(job.images)
                except ZImageError as exc:
                    answer.error = exc
            if answer.error is None:
                answer.entry = CacheEntry(
                    content_key=pending.content_key, images=refs, model=self._engine.model_info
                )
            followers = await self._settle(pending, answer)
            result = self._result(
                request.request_id,
                request.task,
                answer.error,
                pending.arrived_at,
                images=refs,
                started_at=outcome.started_at,
                inference_s=job.seconds,
                provenance=_provenance(pending),
            )
            await self._publish(pending.delivery, result)
            await self._answer_followers(followers, answer)

    async def _answer_from(self, pending: Pending, entry: CacheEntry, remember: bool) -> None:
        """Answer with a stored result (a cache hit, or another worker's fresh result)."""
        answer = Answer(None, entry)
        followers = await self._settle(pending, answer) if remember else []
        for waiting in (pending, *followers):
            await self._publish_answer(waiting, answer)

    async def _settle(self, leader: Pending, answer: Answer) -> list[Pending]:
        """End the leader's content key: remember a success (before anyone is told) and
        release the lock; returns the followers to answer."""
        key = leader.content_key
        waiting: list[str] = []
        if answer.entry is not None:
            # Remember while the key is still in flight here: an identical request that
            # arrives meanwhile joins the followers instead of missing the cache.
            waiting = [p.request.request_id for p in self._inflight.followers(key)]
            await self.cache.remember([leader.request.request_id, *waiting], answer.entry)
        followers = self._inflight.settle(key)
        if answer.entry is not None and (late := followers[len(waiting) :]):
            await self.cache.remember([p.request.request_id for p in late], answer.entry)
        if key in self._locked:
            self._locked.discard(key)
            await self.cache.unlock(key, self._owner)
        return followers

    async def _answer_followers(self, followers: list[Pending], answer: Answer) -> None:
        for follower in followers:
            await self._publish_answer(follower, answer)

    async def _publish_answer(self, pending: Pending, answer: Answer) -> None:
        """Publish a result that ran no inference for ``pending``: a stored result, or the
        error of the request it followed."""
        request, entry = pending.request, answer.entry
        result = self._result(
            request.request_id,
            request.task,
            answer.error,
            pending.arrived_at,
            images=entry.images if entry else None,
            cache_hit=entry is not None,
            model=entry.model if entry else None,
            provenance=_provenance(pending),
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

    # -- text erasure --------------------------------------------------------------------

    async def _erase(self, delivery: Delivery, request: EraseTextRequest) -> None:
        """Read the source; answer from the cache, or erase its text off the loop, store the
        image, remember it and publish."""
        arrived = delivery.record.timestamp / 1000
        with bound_contextvars(request_id=request.request_id):
            started_wall, started = time.time(), time.perf_counter()
            entry, cache_hit, error = None, False, None
            try:
                entry, cache_hit = await self._erase_or_recall(request, _forced(delivery))
            except ZImageError as exc:
                error = exc
            except Exception as exc:
                log.exception("erase_failed")
                error = InternalError(f"text erasure failed: {exc!r}")
            result = self._result(
                request.request_id,
                request.task,
                error,
                arrived,
                images=entry.images if entry else None,
                started_at=started_wall,
                inference_s=0.0 if cache_hit else time.perf_counter() - started,
                cache_hit=cache_hit,
                model=entry.model if entry else None,
                text_regions=entry.text_regions if entry else None,
            )
            await self._publish(delivery, result)

    async def _erase_or_recall(
        self, request: EraseTextRequest, forced: bool = False
    ) -> tuple[CacheEntry, bool]:
        loop = asyncio.get_running_loop()
        params = request.params
        source = await read_source(params.source, self._storage)
        eraser = await loop.run_in_executor(self._erase_pool, self._text_eraser)
        engine = eraser.resolve(params.engine)
        model = self._engine.model_info if engine == "diffusion" else CLASSICAL_MODEL
        source_sha = hashlib.sha256(source.data).hexdigest()
        key = erase_content_key(source_sha, list(params.languages), engine, model)
        cached = None if forced else await self._cached(request.request_id, key)
        if cached is not None:
            return cached, True
        running = self._erasing.get(key)
        if running is not None:  # the same image is being erased: share its result
            self.stats["followers"] += 1
            entry = await asyncio.shield(running)
            await self.cache.remember([request.request_id], entry)
            return entry, True
        self._erasing[key] = running = loop.create_future()
        try:
            # The diffusion engine needs the model's device: it runs on the engine thread.
            pool = self._engine_thread if engine == "diffusion" else self._erase_pool
            erased = await loop.run_in_executor(pool, eraser.erase, source, engine)
            entry = CacheEntry(
                content_key=key,
                images=await self._store_images([erased.image]),
                text_regions=[box.as_region() for box in erased.regions],
                model=model,
            )
            await self.cache.remember([request.request_id], entry)
        except asyncio.CancelledError:
            running.cancel()
            raise
        except Exception as exc:
            running.set_exception(exc)
            running.exception()  # retrieved here: there may be no followers
            raise
        finally:
            del self._erasing[key]
        running.set_result(entry)
        return entry, False

    def _text_eraser(self) -> TextEraser:
        # Built on first use, off the loop: the OCR models load in about 0.2 s.
        if self._eraser is None:
            settings = self._settings
            self._eraser = TextEraser(
                make_detector(
                    settings.ocr_backend, settings.ocr_model_dir, settings.ocr_allow_download
                ),
                diffusion=DiffusionInpainter(self._engine),
                prefer_diffusion=self._engine.report.device != "cpu",
            )
        return self._eraser

    # -- refusals ------------------------------------------------------------------------

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

    # -- results and offsets -------------------------------------------------------------

    def _result(
        self,
        request_id: str | None,
        task: str | None,
        error: ZImageError | None,
        arrived_at: float,
        images: list[ImageRef] | None = None,
        started_at: float | None = None,
        inference_s: float = 0.0,
        cache_hit: bool = False,
        model: ModelInfo | None = None,
        text_regions: list[TextRegion] | None = None,
        provenance: Provenance | None = None,
    ) -> ResultEvent:
        now = time.time()
        queued = (started_at if started_at is not None else now) - arrived_at
        if started_at is not None:
            self.metrics.queue_seconds.observe(max(0.0, queued))
        return ResultEvent(
            request_id=request_id,
            task=task,
            status="succeeded" if error is None else error.status,  # type: ignore[arg-type]
            images=images or [],
            text_regions=text_regions or [],
            cache_hit=cache_hit,
            error=None if error is None else ErrorInfo(**error.to_dict()),  # type: ignore[arg-type]
            model=model or self._engine.model_info,
            provenance=provenance,
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
        self.metrics.results.labels(result.task or "unknown", result.status).inc()
        self._commit_wanted.set()

    async def _committer(self) -> None:
        """Commit answered offsets, coalescing bursts of answers into one commit."""
        while not self._stopping.is_set():
            await self._commit_wanted.wait()
            self._commit_wanted.clear()
            await self._commit()
            await asyncio.sleep(0.02)

    async def _lock_keeper(self) -> None:
        """Extend the cache locks this worker holds, a third of a lock TTL at a time."""
        ttl = self._settings.cache_lock_ttl_s
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), ttl / 3)
            for key in list(self._locked):
                await self.cache.extend_lock(key, self._owner, ttl)

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
