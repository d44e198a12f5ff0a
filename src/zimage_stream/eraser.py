"""Text erasure: detect text, mask it, inpaint it, and check the result once more."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import structlog
from PIL import Image

from .errors import ModelUnavailableError
from .inpaint import inpaint_classical
from .masks import text_mask
from .ocr import TextBox, TextDetector
from .sources import SourceImage

log = structlog.get_logger(__name__)

MAX_PASSES = 2


@dataclass(frozen=True)
class EraseResult:
    """The cleaned image, the text found before erasing, and the final mask."""

    image: Image.Image
    regions: list[TextBox]
    mask: np.ndarray  # hard mask: what was inpainted
    touched: np.ndarray  # where any pixel may differ from the source (feathered edges)
    seconds: float


class TextEraser:
    """Runs the erase pipeline with one detector (blocking; call it off the event loop)."""

    def __init__(self, detector: TextDetector) -> None:
        self._detector = detector

    def erase(self, source: SourceImage, engine: str = "auto") -> EraseResult:
        started = time.perf_counter()
        if engine == "diffusion":
            raise ModelUnavailableError(
                "the diffusion inpainting engine is not available in this worker yet; "
                "use engine 'classical' or 'auto'"
            )
        rgb = source.pixels
        # 1. Find the text (kept for the result: what was there before erasing).
        regions = self._detector.detect(rgb)
        boxes, cleaned = list(regions), rgb
        mask = np.zeros(rgb.shape[:2], dtype=np.uint8)
        touched = np.zeros(rgb.shape[:2], dtype=bool)
        # 2. Mask and fill; 3. look again, and fill what the first pass left.
        for attempt in range(MAX_PASSES):
            if not boxes:
                break
            layer = text_mask(rgb.shape[:2], boxes)
            mask = np.maximum(mask, layer.hard)
            touched |= layer.soft > 0
            cleaned = inpaint_classical(cleaned, layer)
            boxes = self._detector.detect(cleaned) if attempt + 1 < MAX_PASSES else []
        # 4. Put transparency back exactly as it was.
        image = Image.fromarray(cleaned)
        if source.has_alpha:
            image.putalpha(source.image.getchannel("A"))
        seconds = time.perf_counter() - started
        log.info("text_erased", regions=len(regions), seconds=round(seconds, 3))
        return EraseResult(image, regions, mask, touched, seconds)
