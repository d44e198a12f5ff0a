"""Filling masked text regions: the classical (CPU) engine.

OpenCV's Telea inpainting propagates the surrounding colours into the hard mask. It runs
per region crop, so a 4000 px product photo costs what its text costs, not what its
pixels cost. The eraser blends the result in through the feathered mask. Past its
deadline it stops between two regions with ``TimeoutError``.

Telea diffuses colour inward, which flattens grain, but the masks hug the strokes, so
what it fills is a few pixels wide. OpenCV's frequency-selective reconstruction (FSR,
``cv2.xphoto`` in the contrib build) keeps more of a texture's structure; measured on the
bench's textured images it was not worth its time (the figures are in the README).

Telea also mixes the two sides of an edge that crosses a hole: text laid across a
product's outline left the outline notched or bulging. So where the colours around a hole
fall into two groups well apart (a product and what is behind it), each hole pixel is
given a side (by the straight line that parts the two sides around the hole, where one
does, else by the known pixel nearest to it) and each side is filled from its own known
pixels only: the outline runs on through the hole instead of being blurred. Where much
of the band around the hole lies between the two groups, that is a third colour (a line
from a product's edge on to another object), not an outline's blend: Telea alone then,
as the third colour's part of the hole took the nearest side's colour.

A large hole (a text area filled whole, not just its strokes) is filled at half size and
only its border at full size: about the same figures on the bench (README), in a
fraction of the time.
"""

from __future__ import annotations

import time

import cv2
import numpy as np

from .masks import colour_groups


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
        result = _fill(crop, hole.astype(np.uint8), radius)
        # Only the hole is written back: the crop can reach into a neighbouring region
        # already filled (glyphs a few pixels apart), which the source would restore.
        filled[y0:y1, x0:x1][hole > 0] = result[..., ::-1][hole > 0]
    return filled


#: a hole this large (px) is filled at half size but for a border this wide (see _telea)
LARGE_HOLE_PX = 4000
BORDER_PX = 4
#: two groups of colours around a hole are the two sides of an edge when their centres
#: are this far apart (levels, RGB distance) and the smaller holds this share of them
SIDES_APART = 48.0
SIDES_MIN_SHARE = 0.1
#: a straight line parts the two sides when it puts this share of the band on its side
LINE_FIT = 0.97
#: a known pixel this far along from one side's colour to the other's is a blend of both
BLEND = (0.15, 0.85)
BLENDED = 3
#: more of the band than this between the two sides is a third colour, not an outline's
#: blend: the sides are not two (a line across a product's edge onto a third object)
MAX_BLENDED_SHARE = 0.2


def _fill(bgr: np.ndarray, hole: np.ndarray, radius: int) -> np.ndarray:
    """``bgr`` with ``hole`` (uint8, 0/255) filled: by Telea, and side by side where an
    edge crosses the hole (see the module)."""
    inside = hole > 0
    kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    band = (cv2.dilate(hole, kernel) > 0) & ~inside
    sides = _sides(bgr, band, inside)
    if sides is None:
        return _telea(bgr, hole, radius)
    hole_side = _hole_sides(hole, band, sides)
    filled = bgr.copy()
    for side in (1, 2):
        mine = inside & (hole_side == side)
        if not mine.any():
            continue
        # The other side's pixels take the colour of this side's pixel nearest to them,
        # so only this side's colours flow into the hole.
        own = sides == side
        ys, xs = _nearest(own)
        other = ~own & ~inside
        extended = bgr.copy()
        extended[other] = bgr[ys[other], xs[other]]
        result = _telea(extended, hole, radius)
        filled[mine] = result[mine]
    return filled


def _telea(bgr: np.ndarray, hole: np.ndarray, radius: int) -> np.ndarray:
    """Telea's fill of ``hole`` (uint8, 0/255). A hole of ``LARGE_HOLE_PX`` or more (a text
    area filled whole) is filled at half size, where Telea's result is smooth anyway, and
    again at full size only within ``BORDER_PX`` of its edge, where it meets the known
    pixels. Telea's time grows with the hole's pixels: on a 620x120 px hole this took about
    a quarter of it, the fill within a level of Telea's at full size on average."""
    if np.count_nonzero(hole) < LARGE_HOLE_PX:
        return cv2.inpaint(bgr, hole, radius, cv2.INPAINT_TELEA)
    height, width = hole.shape
    half = ((width + 1) // 2, (height + 1) // 2)
    even = cv2.copyMakeBorder(bgr, 0, height % 2, 0, width % 2, cv2.BORDER_REPLICATE)
    padded = cv2.copyMakeBorder(hole, 0, height % 2, 0, width % 2, cv2.BORDER_CONSTANT, value=0)
    # A half-size pixel is in the hole when any of its four pixels is.
    small_hole = padded.reshape(half[1], 2, half[0], 2).max(axis=(1, 3))
    small = cv2.inpaint(
        cv2.resize(even, half, interpolation=cv2.INTER_AREA),
        small_hole,
        max(1, (radius + 1) // 2),
        cv2.INPAINT_TELEA,
    )
    coarse = cv2.resize(small, (2 * half[0], 2 * half[1]), interpolation=cv2.INTER_LINEAR)
    inner = cv2.erode(hole, np.ones((2 * BORDER_PX + 1, 2 * BORDER_PX + 1), np.uint8)) > 0
    seeded = bgr.copy()
    seeded[inner] = coarse[:height, :width][inner]
    border = np.where(inner, 0, hole).astype(np.uint8)
    return cv2.inpaint(seeded, border, radius, cv2.INPAINT_TELEA)


def _hole_sides(hole: np.ndarray, band: np.ndarray, sides: np.ndarray) -> np.ndarray:
    """Which side (1 or 2) each pixel of ``hole`` is on. Where a straight line parts the
    band's two sides (an outline is straight across a text line), the line does, so the
    outline runs on straight through the hole; else each hole pixel takes the side of the
    known pixel nearest to it."""
    known = band & (sides != BLENDED)
    ys, xs = np.nonzero(known)
    labels = sides[ys, xs]
    design = np.stack([np.ones(len(xs)), xs, ys], 1).astype(np.float64)
    weights, *_ = np.linalg.lstsq(design, (labels == 2).astype(np.float64), rcond=None)
    along = design[:, 1:] @ weights[1:]  # distance along the fitted line's normal
    order = np.argsort(along)
    count, twos = len(order), int((labels == 2).sum())
    # Cutting before the i-th pixel (in that order), side 1 below and side 2 above puts
    # i + twos - 2 * (side-2 pixels below) of them on their side; the other way round, the rest.
    twos_below = np.r_[0, np.cumsum(labels[order] == 2)]
    right = np.arange(count + 1) + twos - 2 * twos_below
    best = np.maximum(right, count - right)
    cut = int(np.argmax(best))
    if best[cut] >= LINE_FIT * count:
        threshold = along[order[cut]] if cut < count else np.inf
        below, above = (1, 2) if right[cut] >= count - right[cut] else (2, 1)
        hy, hx = np.nonzero(hole)
        by_line = np.zeros(hole.shape, np.int8)
        by_line[hy, hx] = np.where(hx * weights[1] + hy * weights[2] < threshold, below, above)
        return by_line
    ys, xs = _nearest(known)
    by_nearest: np.ndarray = sides[ys, xs]
    return by_nearest


def _nearest(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every pixel, the row and column of the ``pixels`` pixel nearest to it."""
    # Each pixel of ``pixels`` (a zero of the transform's input) gets a label of its own.
    _, labels = cv2.distanceTransformWithLabels(
        (~pixels).astype(np.uint8), cv2.DIST_L2, 3, labelType=cv2.DIST_LABEL_PIXEL
    )
    ys, xs = np.nonzero(pixels)
    at = np.zeros((int(labels.max()) + 1, 2), np.intp)
    at[labels[ys, xs]] = np.stack([ys, xs], 1)
    return at[labels, 0], at[labels, 1]


def _sides(bgr: np.ndarray, band: np.ndarray, inside: np.ndarray) -> np.ndarray | None:
    """Every known pixel's side (1 or 2, or ``BLENDED`` for a blend of both; 0 in the hole)
    when the colours of the ``band`` around the hole fall into two groups well apart; None
    when they do not (no edge to keep)."""
    pixels = bgr[band].astype(np.float32)
    if len(pixels) < 16:
        return None
    centres = colour_groups(pixels, 2)
    if float(np.linalg.norm(centres[0] - centres[1])) < SIDES_APART:
        return None
    # Where each pixel lies between the two centres (0 at the first, 1 at the second):
    # near either it is that side's; between BLEND's bounds it is the edge's own blend of
    # both (an anti-aliased outline), which neither side's fill may take.
    span = centres[1] - centres[0]
    along = (bgr.reshape(-1, 3).astype(np.float32) - centres[0]) @ span / float(span @ span)
    along = along.reshape(bgr.shape[:2])
    sides = np.where(along < 0.5, 1, 2).astype(np.int8)
    sides[(along > BLEND[0]) & (along < BLEND[1])] = BLENDED
    around = sides[band]
    share = float((around == 2).sum() / max(1, (around != BLENDED).sum()))
    if min(share, 1 - share) < SIDES_MIN_SHARE:
        return None
    if float((around == BLENDED).mean()) > MAX_BLENDED_SHARE:
        return None
    sides[inside] = 0
    return sides
