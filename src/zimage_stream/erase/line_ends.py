"""Line ends the detector cut short, found again by reading past them.

On grain, the detector's probability map stops short of a faint line's first or last
glyph (a lower threshold gives the same boxes: the map itself stops), so the glyph is
left out of the box, and so of the mask: most of the bench's lines masked short are
such lines, their missed strokes 0.6 to 1 text height past the box. The recogniser sees
those glyphs. For each end of a box, the box's last ``CONTEXT_SHARE`` heights and
``REACH_SHARE`` of a height past the end are read as one crop, and where a letter or
digit is read past the end with a probability of at least ``MIN_SCORE``, the box is
lengthened by that much at that end (then read past its new end once more). An end is
not read where what lies past it is mostly another box: the line's next box, or another
line, is found already. Most ends read past find nothing, or only punctuation, or an
ideograph the recogniser makes of empty space ("東" before a Chinese line on a clean
background, 0.2-0.4), which the score and the character class leave out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

if TYPE_CHECKING:
    from .ocr import TextBox

#: how far past an end is read, and how much of the box before it, in text heights
REACH_SHARE = 1.0
CONTEXT_SHARE = 2.0
#: a letter or digit read past the end with this probability lengthens the box
MIN_SCORE = 0.9
#: an end is read this many times at most (once more after each lengthening)
ROUNDS = 2
#: an end is not read when what lies past it overlaps another box by this share of the
#: smaller of the two
MAX_OVERLAP = 0.2


def lengthened(engine: Any, rgb: np.ndarray, boxes: list[TextBox]) -> list[np.ndarray]:
    """The polygons of ``boxes`` in ``rgb`` (H, W, 3 uint8), each lengthened at an end
    where ``engine`` (a ``rapidocr_onnxruntime.RapidOCR``) reads a character past it (see
    the module)."""
    polygons = [box.polygon.astype(np.float32) for box in boxes]
    ends = [(k, end) for k, p in enumerate(polygons) if _axis(p) is not None for end in (1, -1)]
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    for _ in range(ROUNDS):
        reads = []  # (box, end, the crop's polygon)
        for k, end in ends:
            if not _overlaps(_past(polygons[k], end, boxes[k].height), polygons, k):
                reads.append((k, end, _end_crop(polygons[k], end, boxes[k].height)))
        if not reads:
            break
        crops = engine.get_crop_img_list(bgr, [crop for _, _, crop in reads])
        usable = [(read, crop) for read, crop in zip(reads, crops, strict=True) if crop.size]
        if not usable:
            break
        columns = _read(engine.text_rec, [crop for _, crop in usable])
        ends = [
            (k, end)
            for ((k, end, polygon), crop), read in zip(usable, columns, strict=True)
            if _reads_past(read, crop.shape[1], end, _past_px(polygon, crop, boxes[k].height))
        ]
        for k, end in ends:
            polygons[k] = _moved(polygons[k], end, REACH_SHARE * boxes[k].height)
    return polygons


def _axis(polygon: np.ndarray) -> np.ndarray | None:
    """The unit vector along a box's line, from its first corner to its second; None when
    that is not its longer side (a glyph's box standing upright: not read here). A crop
    along it is at least twice as wide as high, so RapidOCR never turns it upright."""
    along = polygon[1] - polygon[0]
    size = float(np.linalg.norm(along))
    if size == 0 or size < float(np.linalg.norm(polygon[3] - polygon[0])):
        return None
    unit: np.ndarray = along / size
    return unit


def _shift(polygon: np.ndarray, end: int) -> tuple[np.ndarray, np.ndarray]:
    """Which of ``polygon``'s corners are at ``end`` (1: along the line, -1: back), and the
    unit step that moves them outwards (a corner's share of it: 1 at the end, 0 elsewhere)."""
    unit = _axis(polygon)
    assert unit is not None
    at_end = np.sign((polygon - polygon.mean(0)) @ unit) == end
    return at_end, at_end[:, None] * unit * end


def _moved(polygon: np.ndarray, end: int, by: float) -> np.ndarray:
    """``polygon`` with its two corners at ``end`` moved ``by`` pixels outwards (negative:
    inwards)."""
    _, step = _shift(polygon, end)
    moved: np.ndarray = polygon + step * by
    return moved.astype(np.float32)


def _past(polygon: np.ndarray, end: int, height: float) -> np.ndarray:
    """The stretch past ``end`` that would be added (a convex polygon)."""
    at_end, step = _shift(polygon, end)
    corners = polygon[at_end]
    farther = corners + step[at_end] * REACH_SHARE * height
    hull: np.ndarray = cv2.convexHull(np.concatenate([corners, farther]).astype(np.float32))
    return hull


def _overlaps(stretch: np.ndarray, polygons: list[np.ndarray], own: int) -> bool:
    """Whether ``stretch`` overlaps a box other than ``own`` by MAX_OVERLAP of the
    smaller of the two."""
    area = cv2.contourArea(stretch)
    for k, polygon in enumerate(polygons):
        if k == own:
            continue
        other = polygon.reshape(-1, 1, 2)
        shared, _ = cv2.intersectConvexConvex(stretch, other)
        if shared > MAX_OVERLAP * min(area, cv2.contourArea(other)):
            return True
    return False


def _end_crop(polygon: np.ndarray, end: int, height: float) -> np.ndarray:
    """The polygon read for ``end``: the box's last CONTEXT_SHARE heights (or all of it)
    and REACH_SHARE of a height past the end."""
    length = float(np.linalg.norm(polygon[1] - polygon[0]))
    farther = _moved(polygon, end, REACH_SHARE * height)
    cut = length - min(length, CONTEXT_SHARE * height)
    return _moved(farther, -end, -cut) if cut > 0 else farther


def _past_px(polygon: np.ndarray, crop: np.ndarray, height: float) -> float:
    """How many of ``crop``'s columns lie past the box's end."""
    return REACH_SHARE * height * crop.shape[1] / float(np.linalg.norm(polygon[1] - polygon[0]))


def _read(recogniser: Any, crops: list[np.ndarray]) -> list[list[tuple[str, float, float]]]:
    """Each crop's characters as (character, probability, column in the crop), from one
    batch through the recogniser (PP-OCR's CTC: a character is a run of columns)."""
    ratio = max(crop.shape[1] / crop.shape[0] for crop in crops)
    batch = np.stack([recogniser.resize_norm_img(crop, ratio) for crop in crops])
    predictions = recogniser.session(batch.astype(np.float32))[0]
    height = recogniser.rec_image_shape[1]
    width = int(height * ratio)  # the batch's padded width
    alphabet = recogniser.postprocess_op.character
    reads = []
    for crop, prediction in zip(crops, predictions, strict=True):
        scaled = min(width, int(np.ceil(height * crop.shape[1] / crop.shape[0])))
        labels, scores = prediction.argmax(1), prediction.max(1)
        steps = len(labels)
        characters = []
        start = 0
        while start < steps:
            stop = start
            while stop + 1 < steps and labels[stop + 1] == labels[start]:
                stop += 1
            if labels[start] != 0:  # 0 is CTC's blank
                middle = (start + stop + 1) / 2 / steps * width * crop.shape[1] / scaled
                score = float(scores[start : stop + 1].max())
                characters.append((alphabet[labels[start]], score, middle))
            start = stop + 1
        reads.append(characters)
    return reads


def _reads_past(read: list[tuple[str, float, float]], width: int, end: int, past: float) -> bool:
    """Whether ``read`` (of a crop ``width`` columns wide, ``past`` of them past the box's
    ``end``) has a letter or digit past the end with at least MIN_SCORE."""
    for character, score, column in read:
        beyond = past - column if end == -1 else column - (width - past)
        if beyond > 0 and character.isalnum() and score >= MIN_SCORE:
            return True
    return False
