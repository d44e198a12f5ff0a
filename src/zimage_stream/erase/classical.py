"""Filling masked text regions: the classical (CPU) engine.

OpenCV's Telea inpainting propagates the surrounding colours into the hard mask. It runs
per region crop, so a 4000 px product photo costs what its text costs, not what its
pixels cost. The eraser blends the result in through the feathered mask. Past its
deadline it stops between two regions with ``TimeoutError``.

Telea diffuses colour inward, which flattens grain, but the masks hug the strokes, so
what it fills is a few pixels wide. OpenCV's frequency-selective reconstruction (FSR,
``cv2.xphoto`` in the contrib build) keeps more of a texture's structure; measured on the
bench's textured images it was not worth its time (the figures are in the README).
"""

from __future__ import annotations

import time

import cv2
import numpy as np


def inpaint_classical(
    rgb: np.ndarray,
    hard: np.ndarray,
    region: np.ndarray,
    deadline: float | None = None,
    radius: int = 5,
) -> np.ndarray:
    """The full-size image with ``hard`` filled from its surroundings, one connected part
    of ``region`` (the feathered area) at a time; not yet blended. ``deadline`` is a
    ``time.monotonic()`` value."""
    filled = rgb.copy()
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        region.astype(np.uint8), connectivity=8
    )
    margin = 4 * radius
    height, width = hard.shape
    for index in range(1, count):
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"filling stopped at its deadline after {index - 1} regions")
        x, y, w, h, _ = stats[index]
        y0, x0 = max(0, y - margin), max(0, x - margin)
        y1, x1 = min(height, y + h + margin), min(width, x + w + margin)
        crop = np.ascontiguousarray(rgb[y0:y1, x0:x1, ::-1])
        hole = np.where(labels[y0:y1, x0:x1] == index, hard[y0:y1, x0:x1], 0)
        result = cv2.inpaint(crop, hole.astype(np.uint8), radius, cv2.INPAINT_TELEA)
        # Only the hole is written back: the crop can reach into a neighbouring region
        # already filled (glyphs a few pixels apart), which the source would restore.
        filled[y0:y1, x0:x1][hole > 0] = result[..., ::-1][hole > 0]
    return filled
