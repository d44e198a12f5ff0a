"""The worker's ``erase_text`` path, from a validated request to its result event.

Read the source's bytes safely, ask the fast path (``dedup``: identical source bytes,
languages, engine and model are erased once), then decode and erase off the event loop
(the classical engine on its own thread, the diffusion engine on the engine thread, which
owns the device) within the request's budget and a bound on the pixels decoded at once,
store the cleaned image and settle the content key. Nothing is decoded for a request that
is answered from the cache or by identical work.
The erasure itself is ``erase.TextEraser``'s; this module only connects it to the
worker's storage, fast path and threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field

import structlog

from .cache import CacheEntry, erase_content_key
from .dedup import Answer, Dedup
from .engine import ImageEngine
from .engine.inpaint import DiffusionInpainter
from .erase import (
    EraseResult,
    TextEraser,
    classical_model,
    decode_image,
    detector_for,
    fetch_source,
    source_pixels,
)
from .errors import ZImageError, as_error
from .schemas import EraseTextRequest, ResultEvent
from .settings import OcrSettings
from .storage import Storage

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
    """Answers ``erase_text`` requests with the worker's parts; ``close`` when it stops."""

    engine: ImageEngine
    storage: Storage
    dedup: Dedup
    ocr: OcrSettings
    engine_thread: Executor  # owns the device: the diffusion engine runs there
    encode_pool: Executor
    image_format: str
    pixels_in_flight: int
    _pool: ThreadPoolExecutor = field(
        init=False, default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="zimage-erase")
    )
    _eraser: TextEraser | None = field(init=False, default=None)
    _pixels: PixelBudget = field(init=False)

    def __post_init__(self) -> None:
        self._pixels = PixelBudget(self.pixels_in_flight)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def answer(
        self, request: EraseTextRequest, arrived_at: float, budget_s: float, forced: bool
    ) -> ResultEvent | None:
        """The request's result event, or None when the worker stopped while it waited for
        identical work (it stays uncommitted and is read again by the next owner)."""
        started_wall, started = time.time(), time.perf_counter()
        entry, error, cache_hit = None, None, False
        try:
            answered = await self._erase_or_recall(request, budget_s, forced)
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
            arrived_at=arrived_at,
            images=entry.images if entry else None,
            text_regions=entry.text_regions if entry else None,
            cache_hit=cache_hit,
            started_at=started_wall,
            inference_s=0.0 if cache_hit else time.perf_counter() - started,
        )

    async def _erase_or_recall(
        self, request: EraseTextRequest, budget_s: float, forced: bool
    ) -> tuple[CacheEntry, bool] | None:
        """The erased image's entry and whether it was recalled (no erasure ran here)."""
        params = request.params
        loop = asyncio.get_running_loop()
        data = await fetch_source(params.source, self.storage)  # decoded only if computed
        eraser = await loop.run_in_executor(self._pool, self._text_eraser)
        engine = eraser.resolve(params.engine)
        model = (
            self.engine.model_info if engine == "diffusion" else classical_model(self.ocr.backend)
        )
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

        def erase() -> EraseResult:  # the budget runs from when the decoding starts
            deadline = time.monotonic() + budget_s
            return eraser.erase(decode_image(data), engine, params.languages, deadline)

        try:
            # The diffusion engine needs the model's device: it runs on the engine thread.
            pool = self.engine_thread if engine == "diffusion" else self._pool
            async with self._pixels.hold(source_pixels(data)):
                erased = await loop.run_in_executor(pool, erase)
            images = await self.storage.put_images(
                [erased.image], self.image_format, self.encode_pool
            )
        except asyncio.CancelledError:
            await self.dedup.abandon(key)
            raise
        except Exception as exc:
            error = _logged(exc)
            await self.dedup.settle(key, request.request_id, Answer(error=error))
            raise error from None
        regions = [box.as_region() for box in erased.regions]
        entry = CacheEntry(content_key=key, images=images, text_regions=regions, model=model)
        await self.dedup.settle(key, request.request_id, Answer(entry))
        return entry, False

    def _text_eraser(self) -> TextEraser:
        # Built on first use, off the loop: the OCR models load in a fraction of a second.
        if self._eraser is None:
            self._eraser = TextEraser(
                detector_for(self.ocr),
                diffusion=DiffusionInpainter(self.engine),
                prefer_diffusion=self.engine.report.device != "cpu",
            )
        return self._eraser


def _logged(exc: Exception) -> ZImageError:
    """``exc`` as the request's error; an unexpected one is logged with its traceback (once:
    the error raised again from the erasure is already a contract error)."""
    if not isinstance(exc, ZImageError):
        log.exception("erase_failed")
    return as_error(exc, "text erasure")
