"""The worker's erase_text path without Kafka: sources are decoded off the event loop,
only when an erasure runs, and never more pixels at once than the budget allows."""

from __future__ import annotations

import asyncio
import base64
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.render import LATIN_FONT, png_bytes, product_scene, with_text
from zimage_stream import erasures
from zimage_stream.cache import MemoryBackend, ResultCache
from zimage_stream.dedup import Dedup
from zimage_stream.engine import ImageEngine
from zimage_stream.erasures import Erasures, PixelBudget
from zimage_stream.schemas import EraseTextRequest
from zimage_stream.settings import OcrSettings, StorageSettings
from zimage_stream.storage import Storage


def _request(request_id: str, data: bytes) -> EraseTextRequest:
    return EraseTextRequest(
        schema_version=1,
        request_id=request_id,
        task="erase_text",
        params={"source": {"base64": base64.b64encode(data).decode()}, "engine": "classical"},
    )


async def test_sources_are_decoded_off_the_loop_and_only_when_erased(
    tiny_engine: ImageEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded_on: list[str] = []
    real_decode = erasures.decode_image

    def recording_decode(data: bytes) -> object:
        decoded_on.append(threading.current_thread().name)
        return real_decode(data)

    monkeypatch.setattr(erasures, "decode_image", recording_decode)
    storage = Storage.from_settings(StorageSettings(url=str(tmp_path / "images")))
    cache = ResultCache(MemoryBackend(), 60, 60)
    pool = ThreadPoolExecutor(1)
    async with Dedup(cache, storage, lock_ttl_s=5) as dedup:
        path = Erasures(tiny_engine, storage, dedup, OcrSettings(), pool, pool, "png", 10**7)
        rendered = with_text(
            product_scene(320, 240), [("SALE", (20, 20), LATIN_FONT, 36, (0, 0, 0))]
        )
        data = png_bytes(rendered.image)
        first = await path.answer(_request("first", data), arrived_at=0, budget_s=60, forced=False)
        again = await path.answer(_request("again", data), arrived_at=0, budget_s=60, forced=False)
        path.close()
    assert first is not None and first.status == "succeeded" and not first.cache_hit
    assert again is not None and again.cache_hit and again.images == first.images
    assert len(decoded_on) == 1  # the repeat was answered without decoding its source
    assert decoded_on[0] != threading.main_thread().name


async def test_the_pixel_budget_holds_back_what_does_not_fit() -> None:
    budget = PixelBudget(100)
    held, order = [0], []

    async def use(name: str, pixels: int, hold_s: float) -> None:
        async with budget.hold(pixels):
            held[0] += pixels
            # Within the budget; an image larger than all of it runs alone.
            assert held[0] <= 100 or held[0] == pixels, (name, held[0])
            order.append(name)
            await asyncio.sleep(hold_s)
            held[0] -= pixels

    await asyncio.gather(
        use("a", 60, 0.05), use("b", 60, 0.01), use("huge", 500, 0.01), use("c", 30, 0.01)
    )
    assert sorted(order) == ["a", "b", "c", "huge"] and order[0] == "a"
