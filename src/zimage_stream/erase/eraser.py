"""Text erasure: detect text, mask it, inpaint it, and check the result once more.

A request's time budget arrives as a ``deadline`` (a ``time.monotonic()`` value). It is
checked between stages (after detection, after a fill pass that the look-again follows)
and by the inpainter inside a fill (between regions, or between denoising steps); once
it has passed, the erase stops with the contract's ``timeout``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np
import structlog
from PIL import Image

from ..errors import InferenceTimeoutError, ModelUnavailableError
from .classical import inpaint_classical
from .masks import TextMask, composite, dilated, text_mask
from .ocr import LANGUAGES, TextBox, TextDetector
from .sources import SourceImage

log = structlog.get_logger(__name__)

MAX_PASSES = 2
#: context kept around a filled area when looking at it again
LOOK_AGAIN_MARGIN_PX = 32
#: what the second look finds is filled only this near what the first filled
LOOK_AGAIN_REACH_PX = 4
#: a filled part whose crop (with its context) is larger than this (px) is not looked at
#: again: it is a large line or an area filled whole (see ``_look_again``)
LOOK_AGAIN_MAX_PX = 150_000


@dataclass(frozen=True)
class EraseResult:
    """The cleaned image, the text found before erasing, the final mask, and where the
    time went (``stages``: seconds spent finding, masking, filling and looking again,
    the same for either engine)."""

    image: Image.Image
    regions: list[TextBox]
    mask: np.ndarray  # hard mask: what was inpainted
    touched: np.ndarray  # where any pixel may differ from the source (feathered edges)
    seconds: float
    stages: dict[str, float] = field(default_factory=dict)
    #: text areas filled whole, their text not told from its background (see ``masks``) ...
    unsure: int = 0
    #: ... and where they are in ``mask`` (bool; None when there were none)
    whole: np.ndarray | None = None


Inpainter = Callable[[np.ndarray, np.ndarray, np.ndarray, float | None], np.ndarray]
"""Fills text in an image: ``fill(rgb, hard, region, deadline)``.

``rgb`` is the image (H, W, 3 uint8), ``hard`` what must be filled (H, W uint8, 0 or 255)
and ``region`` the whole feathered area around it (H, W bool). It returns the full-size
filled image (H, W, 3 uint8), not yet blended: the eraser blends it in through the
feathered mask. Past ``deadline`` (``time.monotonic()``, or None for none) it stops
early with a ``TimeoutError`` (the engine's ``DeadlineExceeded`` is one)."""


@dataclass(frozen=True)
class _Deadline:
    """A ``time.monotonic()`` deadline, or none, and how to say that it has passed."""

    at: float | None
    began: float = field(default_factory=time.monotonic)

    def check(self, stage: str) -> None:
        if self.at is not None and time.monotonic() >= self.at:
            raise self.passed(stage)

    def passed(self, stage: str) -> InferenceTimeoutError:
        left = max(0.0, (self.at or self.began) - self.began)
        return InferenceTimeoutError(
            f"text erasure took longer than its budget ({left:.3g} s were left of it when "
            f"the erase began); it was stopped {stage}"
        )


class TextEraser:
    """Runs the erase pipeline with one detector (blocking; call it off the event loop).

    ``diffusion`` is the Z-Image inpainter when a model is loaded; ``auto`` uses it when
    ``prefer_diffusion`` (a GPU is there) and the classical CPU engine otherwise.
    """

    def __init__(
        self,
        detector: TextDetector,
        diffusion: Inpainter | None = None,
        prefer_diffusion: bool = False,
    ) -> None:
        self._detector = detector
        self._diffusion = diffusion
        self._prefer_diffusion = prefer_diffusion

    def resolve(self, engine: str) -> str:
        """The engine that ``engine`` means here: ``diffusion`` or ``classical``."""
        if engine == "auto":
            use = self._diffusion is not None and self._prefer_diffusion
            return "diffusion" if use else "classical"
        if engine == "diffusion" and self._diffusion is None:
            raise ModelUnavailableError(
                "the diffusion inpainting engine needs the Z-Image model, which this process "
                "has not loaded; use engine 'classical' or 'auto'"
            )
        return engine

    def erase(
        self,
        source: SourceImage,
        engine: str = "auto",
        languages: Collection[str] = LANGUAGES,
        deadline: float | None = None,
    ) -> EraseResult:
        """``source`` without the text of ``languages`` (``en``, ``ch``; see ``ocr``).

        ``deadline`` (``time.monotonic()``): once it passes, ``InferenceTimeoutError``.
        """
        started, budget = time.perf_counter(), _Deadline(deadline)
        fill = self._inpainter(engine)
        rgb, stages = source.pixels, _Stages()
        # 1. Find the text (kept for the result: what was there before erasing).
        with stages.timing("find"):
            regions = self._detector.detect(rgb, languages=languages)
        budget.check("after finding the text")
        boxes, cleaned, unsure = list(regions), rgb, 0
        whole: np.ndarray | None = None
        mask = np.zeros(rgb.shape[:2], dtype=np.uint8)
        touched = np.zeros(rgb.shape[:2], dtype=bool)
        # 2. Mask and fill; 3. look again where it was filled, and fill what is left.
        for attempt in range(1, MAX_PASSES + 1):
            if not boxes:
                break
            with stages.timing("mask"):
                layer = text_mask(cleaned, boxes, _near(mask) if attempt > 1 else None)
            mask, unsure = np.maximum(mask, layer.hard), unsure + layer.unsure
            if layer.whole is not None:
                whole = layer.whole if whole is None else whole | layer.whole
            touched |= layer.soft > 0
            with stages.timing("fill"):
                cleaned = _fill_pass(fill, cleaned, layer, budget, attempt)
            if attempt == MAX_PASSES:
                break
            budget.check(f"after filling pass {attempt}, before looking again")
            with stages.timing("look_again"):
                boxes = self._look_again(cleaned, layer.hard, languages)
        # 4. Put transparency back exactly as it was.
        image = Image.fromarray(cleaned)
        if source.has_alpha:
            image.putalpha(source.image.getchannel("A"))
        seconds = time.perf_counter() - started
        log.info(
            "text_erased",
            regions=len(regions),
            unsure=unsure,
            seconds=round(seconds, 3),
            **{f"{name}_s": round(value, 3) for name, value in stages.seconds.items()},
        )
        return EraseResult(image, regions, mask, touched, seconds, stages.seconds, unsure, whole)

    def _inpainter(self, engine: str) -> Inpainter:
        if self.resolve(engine) == "diffusion":
            assert self._diffusion is not None
            return self._diffusion
        return inpaint_classical

    def _look_again(
        self, cleaned: np.ndarray, hard: np.ndarray, languages: Collection[str]
    ) -> list[TextBox]:
        """Text still found around the filled areas (leftover strokes at a mask's edge).

        Only crops around the mask are searched: text that the first look missed in the
        rest of the image would be missed again, and the crops cost a fraction of it. The
        detector's texture view is left out: on the bench's textured images it found no
        more here and took a fifth of a second per image. So is a crop larger than
        ``LOOK_AGAIN_MAX_PX``, around a large line or an area filled whole: there the
        second look erased no more text on the bench (``--seed 1-5``), took up to 0.45 s of
        an image's time and, filling again along the smooth fill's edges, moved products'
        outlines.
        """
        height, width = hard.shape
        count, _, stats, _ = cv2.connectedComponentsWithStats(
            cv2.dilate(hard, np.ones((LOOK_AGAIN_MARGIN_PX, LOOK_AGAIN_MARGIN_PX), np.uint8))
        )
        boxes: list[TextBox] = []
        for x, y, w, h, _ in stats[1:count]:
            x0, y0 = max(0, x - LOOK_AGAIN_MARGIN_PX), max(0, y - LOOK_AGAIN_MARGIN_PX)
            x1 = min(width, x + w + LOOK_AGAIN_MARGIN_PX)
            y1 = min(height, y + h + LOOK_AGAIN_MARGIN_PX)
            if (x1 - x0) * (y1 - y0) > LOOK_AGAIN_MAX_PX:
                continue
            found = self._detector.detect(
                cleaned[y0:y1, x0:x1], read=False, languages=languages, texture_view=False
            )
            boxes.extend(box.shifted(x0, y0) for box in found)
        return boxes


def _near(filled: np.ndarray) -> np.ndarray:
    """Where the second look may fill: around what the first filled (``filled``, uint8
    0/255). Leftover strokes are there; a box the detector finds farther off, in the
    context kept around a fill, is a product's part or the grain that the fill's smooth
    patch now stands out of (filled whole, a mug's handle went with it)."""
    near: np.ndarray = dilated(filled, LOOK_AGAIN_REACH_PX) > 0
    return near


@dataclass
class _Stages:
    """Seconds spent in each named stage of one erase, summed over its passes."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def timing(self, name: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - began


def _fill_pass(
    fill: Inpainter, rgb: np.ndarray, layer: TextMask, budget: _Deadline, attempt: int
) -> np.ndarray:
    """``rgb`` with ``layer`` filled and blended in through its feathered edge."""
    try:
        filled = fill(rgb, layer.hard, layer.soft > 0, budget.at)
    except TimeoutError as exc:  # the inpainter stopped at the deadline
        raise budget.passed(f"while filling (pass {attempt})") from exc
    return composite(rgb, filled, layer.soft)
