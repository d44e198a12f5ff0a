"""The worker's ``erase_text`` path, from a validated request to its result event.

Read the source's bytes safely, ask the fast path (``dedup``: identical source bytes,
languages, engine and model are erased once), then hand the bytes to the engine process,
which decodes and erases them (the classical engine on its own thread there, the
diffusion engine on the thread that owns the device) within the request's budget, while
this process bounds the source pixels in flight. The cleaned image comes back encoded;
it is stored and the content key settled. Nothing is decoded or sent for a request that
is answered from the cache or by identical work. A source that kills or hangs the engine
is handled like any request that does (``suspects``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import structlog

from .cache import CacheEntry, erase_content_key
from .consumer import Delivery
from .dedup import Answer, Dedup
from .engine.calls import Erased
from .engine_process import EngineProcess
from .erase import classical_model, fetch_source, source_pixels
from .errors import ZImageError, as_error
from .metrics import WorkerMetrics
from .schemas import EraseTextRequest, ModelInfo, ResultEvent
from .settings import OcrSettings
from .storage import Storage
from .suspects import Suspects

log = structlog.get_logger(__name__)


class PixelBudget:
    """At most ``limit`` source pixels decoded at once; an image larger than the limit
    waits until it is alone. Memory is bounded by pixels, not by how many records wait."""

    def __init__(self, limit: int) -> None:
        self._limit, self._held = limit, 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(
                lambda: self._held == 0 or self._held + pixels <= self._limit
            )
            self._held += pixels
        try:
            yield
        finally:
            async with self._changed:
                self._held -= pixels
                self._changed.notify_all()


@dataclass(eq=False)
class Erasures:
    """Answers ``erase_text`` requests with the worker's parts."""

    engine: EngineProcess
    storage: Storage
    dedup: Dedup
    suspects: Suspects
    ocr: OcrSettings
    image_format: str
    pixels_in_flight: int
    metrics: WorkerMetrics
    _pixels: PixelBudget = field(init=False)

    def __post_init__(self) -> None:
        self._pixels = PixelBudget(self.pixels_in_flight)

    async def answer(
        self, delivery: Delivery, request: EraseTextRequest, budget_s: float, forced: bool
    ) -> ResultEvent | None:
        """The request's result event, or None when the worker stopped while it waited for
        identical work (it stays uncommitted and is read again by the next owner)."""
        started_wall, started = time.time(), time.perf_counter()
        entry, error, cache_hit = None, None, False
        try:
            answered = await self._erase_or_recall(delivery, request, budget_s, forced)
            if answered is None:
                return None
            entry, cache_hit = answered
        except Exception as exc:  # the boundary: every request is answered
            error = _logged(exc)
        return ResultEvent.build(
            request.request_id,
            request.task,
            error,
            model=entry.model if entry else self.engine.model_info,
            arrived_at=request.arrived_at(delivery.record.timestamp),
            images=entry.images if entry else None,
            text_regions=entry.text_regions if entry else None,
            cache_hit=cache_hit,
            started_at=started_wall,
            inference_s=0.0 if cache_hit else time.perf_counter() - started,
        )

    def resolve(self, engine: str) -> tuple[str, ModelInfo]:
        """The engine that ``engine`` means here and what produces its images: ``auto`` is
        the diffusion engine on a GPU and the classical one on a CPU."""
        if engine == "auto":
            engine = "classical" if self.engine.report.device == "cpu" else "diffusion"
        if engine == "diffusion":
            return engine, self.engine.model_info
        return engine, classical_model(self.ocr.backend)

    async def _erase_or_recall(
        self, delivery: Delivery, request: EraseTextRequest, budget_s: float, forced: bool
    ) -> tuple[CacheEntry, bool] | None:
        """The erased image's entry and whether it was recalled (no erasure ran here)."""
        params = request.params
        read_started = time.perf_counter()
        data = await fetch_source(params.source, self.storage)  # decoded only if computed
        self.metrics.erase_source_seconds.observe(time.perf_counter() - read_started)
        engine, model = self.resolve(params.engine)
        source_sha = hashlib.sha256(data).hexdigest()
        key = erase_content_key(source_sha, list(params.languages), engine, model)
        claim = await self.dedup.claim(request.request_id, key, forced, budget_s)
        if claim.answer is not None:
            if claim.answer.error is not None:
                raise claim.answer.error
            assert claim.answer.entry is not None
            return claim.answer.entry, True
        if claim.kind == "abandoned":
            return None

        languages: list[str] = list(params.languages)
        fmt = self.image_format

        async def erase(_: list[int], alone: bool) -> list[Erased]:
            started = time.perf_counter()
            try:  # a timed-out or failed erasure held the engine too
                return [await self.engine.erase(data, engine, languages, budget_s, fmt, alone)]
            finally:
                self.metrics.record_erasure(engine, time.perf_counter() - started)

        try:
            async with self._pixels.hold(source_pixels(data)):
                (erased,) = await self.suspects.run([delivery], [budget_s], erase)
            if isinstance(erased, ZImageError):
                raise erased
            images = await self.storage.put_encoded([erased.image], self.image_format)
        except asyncio.CancelledError:
            await self.dedup.abandon(key)
            raise
        except Exception as exc:
            error = _logged(exc)
            await self.dedup.settle(key, request.request_id, Answer(error=error))
            raise error from None
        entry = CacheEntry(content_key=key, images=images, text_regions=erased.regions, model=model)
        await self.dedup.settle(key, request.request_id, Answer(entry))
        return entry, False


def _logged(exc: Exception) -> ZImageError:
    """``exc`` as the request's error; an unexpected one is logged with its traceback (once:
    the error raised again from the erasure is already a contract error)."""
    if not isinstance(exc, ZImageError):
        log.exception("erase_failed")
    return as_error(exc, "text erasure")
