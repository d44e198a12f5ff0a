"""erase_text requests through the real broker and worker."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import KafkaIO
from tests.support.render import LATIN_FONT, png_bytes, product_scene, with_text
from zimage_stream.erase import SourceImage, TextEraser
from zimage_stream.erase.ocr import RapidOcrDetector
from zimage_stream.settings import Settings
from zimage_stream.testing import running_worker


def _erase(request_id: str, source: dict) -> dict:
    return {
        "schema_version": 1,
        "request_id": request_id,
        "task": "erase_text",
        "params": {"source": source, "engine": "auto"},
    }


async def test_erase_text_requests_return_cleaned_images(
    settings: Settings, kafka_io: KafkaIO
) -> None:
    rendered = with_text(
        product_scene(800, 600), [("SALE 50% OFF", (40, 40), LATIN_FONT, 44, (200, 20, 20))]
    )
    data = png_bytes(rendered.image)
    upload = Path(settings.storage.url) / "uploads" / "product.png"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(data)
    async with running_worker(settings):
        await kafka_io.send(_erase("by-uri", {"uri": upload.as_uri()}))
        await kafka_io.send(_erase("by-bytes", {"base64": base64.b64encode(data).decode()}))
        await kafka_io.send(_erase("escape", {"uri": "file:///etc/passwd"}))
        await kafka_io.send(_erase("junk", {"base64": base64.b64encode(b"junk").decode()}))
        diffusion = _erase("diffusion", {"uri": upload.as_uri()})
        diffusion["params"]["engine"] = "diffusion"
        await kafka_io.send(diffusion)
        results = {r["request_id"]: r for r in await kafka_io.results(5)}
        # The same source again, with a new id: answered from the cache.
        await kafka_io.send(_erase("again", {"uri": upload.as_uri()}))
        results = {r["request_id"]: r for r in await kafka_io.results(6)}
    for request_id in ("by-uri", "by-bytes"):
        result = results[request_id]
        assert result["status"] == "succeeded", result["error"]
        assert result["task"] == "erase_text" and len(result["images"]) == 1
        assert any("SALE" in region["text"] for region in result["text_regions"])
        path = Path(result["images"][0]["uri"].removeprefix("file://"))
        with Image.open(path) as cleaned:
            assert cleaned.size == (800, 600)
            assert RapidOcrDetector().detect(np.asarray(cleaned.convert("RGB"))) == []
    assert results["by-uri"]["images"] == results["by-bytes"]["images"]  # same bytes, same object
    again = results["again"]
    assert again["cache_hit"] is True and again["images"] == results["by-uri"]["images"]
    assert again["text_regions"] == results["by-uri"]["text_regions"]
    assert again["timings_ms"]["inference"] == 0
    assert (results["escape"]["status"], results["escape"]["error"]["code"]) == (
        "rejected",
        "source_forbidden",
    )
    assert results["junk"]["error"]["code"] == "source_unreadable"
    # The diffusion engine runs Z-Image inpainting (here the miniature model).
    assert results["diffusion"]["status"] == "succeeded", results["diffusion"]["error"]
    assert results["diffusion"]["model"]["id"] == "tiny"
    assert results["by-uri"]["model"]["id"].startswith("classical:")  # auto on a CPU


async def test_identical_erase_requests_in_flight_are_erased_once(
    settings: Settings, kafka_io: KafkaIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    erased: list[str] = []
    real_erase = TextEraser.erase

    def counting_erase(self: TextEraser, source: SourceImage, engine: str = "auto") -> object:
        erased.append(engine)
        return real_erase(self, source, engine)

    monkeypatch.setattr(TextEraser, "erase", counting_erase)
    rendered = with_text(
        product_scene(640, 480), [("NEW ARRIVAL", (40, 40), LATIN_FONT, 40, (20, 20, 20))]
    )
    source = {"base64": base64.b64encode(png_bytes(rendered.image)).decode()}
    async with running_worker(settings):
        for index in range(3):  # at once: none is cached when the others arrive
            await kafka_io.send(_erase(f"same-{index}", source))
        results = await kafka_io.results(3)
    assert sorted(r["request_id"] for r in results) == ["same-0", "same-1", "same-2"]
    assert all(r["status"] == "succeeded" for r in results), results
    assert len({json.dumps(r["images"]) for r in results}) == 1  # one image for all three
    assert len(erased) == 1, f"erased {len(erased)} times"
    assert sorted(r["cache_hit"] for r in results) == [False, True, True]
