"""The worker's erase_text path without Kafka or an engine process: the source goes to the
engine only when an erasure runs (a repeat is answered without sending it), and never
more pixels at once than the budget allows."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any, cast

from tests.support.render import LATIN_FONT, png_bytes, product_scene, with_text
from tests.support.worker_state import FakeWorkerState
from zimage_stream.cache import MemoryBackend, ResultCache
from zimage_stream.consumer import Delivery
from zimage_stream.dedup import Dedup
from zimage_stream.engine.calls import EncodedImage, Erased, LoadReport
from zimage_stream.engine_process import EngineProcess
from zimage_stream.erase import CLASSICAL_REVISION
from zimage_stream.erasures import Erasures, PixelBudget
from zimage_stream.metrics import WorkerMetrics
from zimage_stream.schemas import EraseTextRequest, ModelInfo
from zimage_stream.settings import OcrSettings, StorageSettings
from zimage_stream.storage import Storage
from zimage_stream.suspects import Attempts, FileAttempts, Suspects


def _request(request_id: str, data: bytes) -> EraseTextRequest:
    return EraseTextRequest(
        schema_version=1,
        request_id=request_id,
        task="erase_text",
        params={"source": {"base64": base64.b64encode(data).decode()}, "engine": "auto"},
    )


class _Engine:
    """Stands in for the engine process: records what it is sent, answers a fixed image."""

    report = LoadReport("tiny", None, "cpu", "float32", "native", 0.1)
    model_info = ModelInfo(id="tiny", revision=None, device="cpu", dtype="float32")

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, str]] = []

    async def erase(self, data: bytes, engine: str, *_: Any) -> Erased:
        self.sent.append((data, engine))
        return Erased(EncodedImage(b"cleaned", 320, 240), regions=[])


class _Record:
    def __init__(self, offset: int) -> None:
        self.source = ("req", 0, offset)
        self.record = self
        self.timestamp = 0


async def test_the_source_reaches_the_engine_only_when_an_erasure_runs(tmp_path: Path) -> None:
    storage = Storage.from_settings(StorageSettings(url=str(tmp_path / "images")))
    cache = ResultCache(MemoryBackend(), 60, 60)
    engine = _Engine()

    async def no_dead_letters(*_: Any) -> None:
        raise AssertionError("nothing here is poison")

    suspects = Suspects(Attempts(FileAttempts(tmp_path / "a.json"), "g"), 2, no_dead_letters)
    rendered = with_text(product_scene(320, 240), [("SALE", (20, 20), LATIN_FONT, 36, (0, 0, 0))])
    data = png_bytes(rendered.image)
    metrics = WorkerMetrics(FakeWorkerState())
    async with Dedup(cache, storage, lock_ttl_s=5) as dedup:
        path = Erasures(
            cast(EngineProcess, engine),
            storage,
            dedup,
            suspects,
            OcrSettings(),
            "png",
            10**7,
            metrics,
        )
        first = await path.answer(_delivery(0), _request("first", data), 60, forced=False)
        again = await path.answer(_delivery(1), _request("again", data), 60, forced=False)
    assert first is not None and first.status == "succeeded" and not first.cache_hit
    assert again is not None and again.cache_hit and again.images == first.images
    # Sent once, as its encoded bytes; "auto" is the classical engine on a CPU.
    assert engine.sent == [(data, "classical")]
    # The classical erase's revision is in the model (and so in the cache key).
    assert first.model.id == "classical:rapidocr+opencv-telea"
    assert first.model.revision == CLASSICAL_REVISION
    # Both sources were read; one erasure ran, on the CPU.
    sample = metrics.registry.get_sample_value
    assert sample("zimage_erase_source_seconds_count") == 2
    assert sample("zimage_erase_seconds_count", {"engine": "classical"}) == 1


def _delivery(offset: int) -> Delivery:
    return cast(Delivery, _Record(offset))


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
