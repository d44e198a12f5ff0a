"""Finding text in product images: detector backends behind one interface.

RapidOCR (PP-OCRv4 detection and recognition, models shipped in the wheel) is the
default and works offline. It is called so that *detector* boxes decide what is text:
RapidOCR drops boxes whose recognition score is below ``text_score`` (0.5) by default,
which would leave faint, rotated or stylised text in place; here every detected box is
kept and recognition only labels it. Large images are tiled so small text survives the
detector's downscaling; small images are upscaled by the detector itself.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

from .schemas import TextRegion

#: the detector downsizes longer sides beyond this; larger images are tiled instead
TILE_PX = 1600
TILE_OVERLAP_PX = 256


@dataclass(frozen=True)
class TextBox:
    """A text region: four corner points (x, y) clockwise from top-left."""

    polygon: np.ndarray
    text: str
    confidence: float

    @property
    def height(self) -> float:
        """The text's height: the shorter side of the box."""
        p = self.polygon
        sides = [float(np.linalg.norm(p[i] - p[(i + 1) % 4])) for i in range(4)]
        return max(1.0, min((sides[0] + sides[2]) / 2, (sides[1] + sides[3]) / 2))

    def as_region(self) -> TextRegion:
        """The box as a result event's ``text_regions`` item."""
        corners = [(round(float(x), 1), round(float(y), 1)) for x, y in self.polygon]
        return TextRegion(box=corners, text=self.text, confidence=round(self.confidence, 4))


class TextDetector(Protocol):
    def detect(self, rgb: np.ndarray) -> list[TextBox]: ...


class RapidOcrDetector:
    """RapidOCR on onnxruntime; thread-safe (one inference at a time)."""

    def __init__(self) -> None:
        from rapidocr_onnxruntime import RapidOCR

        self._engine = RapidOCR()
        self._lock = threading.Lock()

    def detect(self, rgb: np.ndarray) -> list[TextBox]:
        """Boxes found in the image and in a contrast-stretched copy of it (low-contrast
        and translucent text stands out there); their union is what gets erased."""
        boxes = self._detect_tiled(rgb)
        return boxes + self._detect_tiled(_stretch_contrast(rgb))

    def _detect_tiled(self, rgb: np.ndarray) -> list[TextBox]:
        height, width = rgb.shape[:2]
        if max(height, width) <= TILE_PX:
            return self._detect_tile(rgb, 0, 0)
        boxes: list[TextBox] = []
        step = TILE_PX - TILE_OVERLAP_PX
        for top in range(0, max(1, height - TILE_OVERLAP_PX), step):
            for left in range(0, max(1, width - TILE_OVERLAP_PX), step):
                tile = rgb[top : top + TILE_PX, left : left + TILE_PX]
                boxes.extend(self._detect_tile(tile, left, top))
        return boxes  # overlapping duplicates are harmless: the mask is their union

    def _detect_tile(self, rgb: np.ndarray, left: int, top: int) -> list[TextBox]:
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        with self._lock:
            result, _ = self._engine(
                bgr, text_score=0.0, box_thresh=0.3, thresh=0.2, unclip_ratio=1.8
            )
        boxes = []
        for polygon, text, score in result or []:
            points = np.asarray(polygon, dtype=np.float32) + np.array([left, top], np.float32)
            boxes.append(TextBox(points, str(text), float(score)))
        return boxes


def _stretch_contrast(rgb: np.ndarray) -> np.ndarray:
    """Local contrast equalisation (CLAHE) on lightness, colours kept."""
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
    clahe = cv2.createCLAHE(clipLimit=4.0, tileGridSize=(8, 8))
    lab[..., 0] = clahe.apply(lab[..., 0])
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
