"""Masks over text: union of text boxes, grown with the text's size, feathered at the edge.

``hard`` (uint8, 0/255) is what gets inpainted: every box lengthened at both ends of its
line (detector boxes often stop short of a line's last glyph when it is a thin one:
"一", "-", ".") and then grown by a share of its text height on every side, so
anti-aliased edges, shadows and outlines are covered. ``soft`` (float32, 0..1)
is what composites the result back: 1 over the hard mask, falling to exactly 0 a few
pixels outside it, so pixels away from the text are unchanged bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .ocr import TextBox

GROW_SHARE = 0.25  # of the text height, on every side
LINE_END_SHARE = 0.5  # of the text height, at both ends of the line
MIN_GROW_PX = 3


@dataclass(frozen=True)
class TextMask:
    hard: np.ndarray
    soft: np.ndarray

    @property
    def empty(self) -> bool:
        return not self.hard.any()


def text_mask(shape: tuple[int, int], boxes: list[TextBox]) -> TextMask:
    """The hard and feathered masks covering ``boxes`` in an image of ``shape`` (h, w)."""
    hard = np.zeros(shape, dtype=np.uint8)
    feather = MIN_GROW_PX
    for box in boxes:
        grow = max(MIN_GROW_PX, round(GROW_SHARE * box.height))
        feather = max(feather, grow)
        single = np.zeros(shape, dtype=np.uint8)
        polygon = _lengthened(box.polygon, LINE_END_SHARE * box.height)
        cv2.fillPoly(single, [np.round(polygon).astype(np.int32)], 255)
        x, y, w, h = cv2.boundingRect(single)
        if w == 0 or h == 0:
            continue
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1))
        y0, x0 = max(0, y - grow - 1), max(0, x - grow - 1)
        y1, x1 = min(shape[0], y + h + grow + 1), min(shape[1], x + w + grow + 1)
        grown = cv2.dilate(single[y0:y1, x0:x1], kernel)
        hard[y0:y1, x0:x1] = np.maximum(hard[y0:y1, x0:x1], grown)
    return TextMask(hard=hard, soft=_feathered(hard, feather))


def _lengthened(polygon: np.ndarray, by: float) -> np.ndarray:
    """A four-corner box made ``by`` pixels longer at both ends of its longer axis."""
    corners = polygon.astype(np.float32)
    along, across = corners[1] - corners[0], corners[3] - corners[0]
    if np.linalg.norm(along) < np.linalg.norm(across):
        along = across
    length = float(np.linalg.norm(along))
    if length == 0:
        return corners
    ends = np.sign((corners - corners.mean(0)) @ along)[:, None]
    return corners + ends * (along / length * by)


def _feathered(hard: np.ndarray, width: int) -> np.ndarray:
    if not hard.any():
        return np.zeros(hard.shape, dtype=np.float32)
    size = 2 * width + 1
    ring = cv2.dilate(hard, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size)))
    soft = cv2.GaussianBlur(ring.astype(np.float32) / 255.0, (size, size), width / 2)
    soft = np.maximum(soft, hard.astype(np.float32) / 255.0)
    soft[ring == 0] = 0.0  # exactly zero outside the feather ring
    return soft


def composite(original: np.ndarray, filled: np.ndarray, soft: np.ndarray) -> np.ndarray:
    """Blend ``filled`` into ``original`` through ``soft``; untouched where soft is 0."""
    out = original.copy()
    x, y, w, h = cv2.boundingRect((soft > 0).astype(np.uint8))
    if w == 0 or h == 0:
        return out
    area = np.s_[y : y + h, x : x + w]
    alpha = soft[area][..., None]
    blended = original[area].astype(np.float32) * (1 - alpha) + filled[area] * alpha
    region = np.clip(np.round(blended), 0, 255).astype(np.uint8)
    outside = soft[area] == 0
    region[outside] = original[area][outside]
    out[area] = region
    return out
