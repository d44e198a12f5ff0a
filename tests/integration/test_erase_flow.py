"""erase_text requests through the real broker and worker."""

from __future__ import annotations

import base64
import io
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import KafkaIO
from tests.support.render import LATIN_FONT, png_bytes, product_scene, with_text
from zimage_stream.engine.calls import Erased, Faults
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
    rendered = with_text(
        product_scene(640, 480), [("NEW ARRIVAL", (40, 40), LATIN_FONT, 40, (20, 20, 20))]
    )
    source = {"base64": base64.b64encode(png_bytes(rendered.image)).decode()}
    async with running_worker(settings) as worker:
        real_erase = worker.engine.erase

        async def counting_erase(data: bytes, engine: str, *rest: Any) -> Erased:
            erased.append(engine)  # what is sent to the engine process to erase
            return await real_erase(data, engine, *rest)

        monkeypatch.setattr(worker.engine, "erase", counting_erase)
        for index in range(3):  # at once: none is cached when the others arrive
            await kafka_io.send(_erase(f"same-{index}", source))
        results = await kafka_io.results(3)
    assert sorted(r["request_id"] for r in results) == ["same-0", "same-1", "same-2"]
    assert all(r["status"] == "succeeded" for r in results), results
    assert len({json.dumps(r["images"]) for r in results}) == 1  # one image for all three
    assert len(erased) == 1, f"erased {len(erased)} times"
    assert sorted(r["cache_hit"] for r in results) == [False, True, True]


def _sale_sign(width: int = 640, height: int = 480) -> dict:
    rendered = with_text(
        product_scene(width, height), [("SALE 50% OFF", (40, 40), LATIN_FONT, 40, (200, 20, 20))]
    )
    return {"base64": base64.b64encode(png_bytes(rendered.image)).decode()}


async def test_an_erasure_past_its_budget_is_timed_out_on_both_engines(
    settings: Settings, kafka_io: KafkaIO
) -> None:
    # Classical: a large photo whose text detection alone takes longer than 1 s here.
    classical = _erase("slow-classical", _sale_sign(4000, 3000))
    classical["timeout_s"] = 1
    diffusion = _erase("slow-diffusion", _sale_sign())
    diffusion["params"]["engine"] = "diffusion"
    diffusion["timeout_s"] = 1
    async with running_worker(settings) as worker:
        # Each denoising step of the miniature model takes 0.4 s more than it would.
        await worker.engine.set_faults(Faults(step_sleep_s=0.4))
        await kafka_io.send(classical)
        await kafka_io.send(diffusion)
        results = {r["request_id"]: r for r in await kafka_io.results(2)}
        await worker.engine.set_faults(Faults())
        # Nothing was remembered: the same request with time to spare succeeds.
        diffusion["request_id"], diffusion["timeout_s"] = "in-time", 300
        await kafka_io.send(diffusion)
        results = {r["request_id"]: r for r in await kafka_io.results(3)}
    for request_id in ("slow-classical", "slow-diffusion"):
        result = results[request_id]
        assert result["status"] == "timed_out", result
        assert result["error"]["code"] == "timeout" and result["error"]["retriable"] is True
        # Stopped at its deadline by the eraser, or (a CPU so loaded that detection alone
        # runs past the budget and the watchdog's grace) by the engine process's watchdog:
        # a timeout either way, and the message says so.
        assert re.search(r"took longer than its (\S+ s )?budget", result["error"]["message"])
    assert results["in-time"]["status"] == "succeeded" and not results["in-time"]["cache_hit"]


async def test_erase_queue_time_counts_from_submitted_at(
    settings: Settings, kafka_io: KafkaIO
) -> None:
    request = _erase("submitted-earlier", _sale_sign())
    request["submitted_at"] = (datetime.now(UTC) - timedelta(minutes=2)).isoformat()
    async with running_worker(settings):
        await kafka_io.send(request)
        (result,) = await kafka_io.results(1)
    assert result["status"] == "succeeded", result["error"]
    assert result["timings_ms"]["queued"] >= 120_000
    assert result["timings_ms"]["total"] >= 120_000


async def test_languages_name_the_text_that_is_erased(
    settings: Settings, kafka_io: KafkaIO
) -> None:
    source = _sale_sign()
    only_chinese = _erase("only-ch", source)
    only_chinese["params"]["languages"] = ["ch"]
    async with running_worker(settings):
        await kafka_io.send(only_chinese)
        await kafka_io.send(_erase("both", source))
        results = {r["request_id"]: r for r in await kafka_io.results(2)}
    # English text is not what a Chinese-only request looks for: the image comes back as it was.
    assert results["only-ch"]["status"] == "succeeded", results["only-ch"]["error"]
    assert results["only-ch"]["text_regions"] == []
    original = Image.open(io.BytesIO(base64.b64decode(source["base64"]))).convert("RGB")
    path = Path(results["only-ch"]["images"][0]["uri"].removeprefix("file://"))
    with Image.open(path) as returned:
        assert np.array_equal(np.asarray(returned.convert("RGB")), np.asarray(original))
    assert any("SALE" in region["text"] for region in results["both"]["text_regions"])
    assert results["both"]["images"] != results["only-ch"]["images"]
