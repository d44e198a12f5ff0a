"""Line ends cut short by the detector, found again by reading past a box's ends."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.support.render import LATIN_FONT, with_text
from zimage_stream.erase.line_ends import REACH_SHARE, _reads_past, lengthened
from zimage_stream.erase.ocr import TextBox

DARK = (25, 25, 25)


@pytest.fixture(scope="module")
def engine() -> Any:
    from rapidocr_onnxruntime import RapidOCR

    return RapidOCR()


@pytest.fixture(scope="module")
def line() -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A dark 40 px line on a plain backdrop, and its strokes' bounds (x0, y0, x1, y1)."""
    backdrop = Image.new("RGB", (900, 200), (225, 220, 210))
    rendered = with_text(backdrop, [("LIMITED OFFER", (60, 70), LATIN_FONT, 40, DARK)])
    ys, xs = np.nonzero(rendered.strokes)
    return np.asarray(rendered.image), (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))


def _box(x0: float, y0: float, x1: float, y1: float) -> TextBox:
    corners = [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
    return TextBox(np.array(corners, np.float32), "", 0.9)


def _reach(polygon: np.ndarray) -> tuple[float, float]:
    return float(polygon[:, 0].min()), float(polygon[:, 0].max())


def test_a_box_cut_short_is_lengthened_where_the_line_reads_on(engine: Any, line: Any) -> None:
    # A box over "LIM" alone: past its right end the recogniser reads "I", so the box
    # grows there by a text height, and past that "T", so by one more (two rounds, the
    # most); before its left end lies the empty backdrop, and that end stays.
    rgb, (x0, y0, x1, y1) = line
    pad = 6
    cut = _box(x0 - pad, y0 - pad, x0 + 0.25 * (x1 - x0), y1 + pad)
    (polygon,) = lengthened(engine, rgb, [cut])
    left, right = _reach(polygon)
    assert left == pytest.approx(x0 - pad)
    assert right == pytest.approx(_reach(cut.polygon)[1] + 2 * REACH_SHARE * cut.height)


def test_a_whole_line_keeps_its_box(engine: Any, line: Any) -> None:
    rgb, (x0, y0, x1, y1) = line
    whole = _box(x0 - 6, y0 - 6, x1 + 6, y1 + 6)
    (polygon,) = lengthened(engine, rgb, [whole])
    np.testing.assert_array_equal(polygon, whole.polygon)


def test_an_end_is_not_read_into_the_lines_next_box(engine: Any, line: Any) -> None:
    # The detector split the line into two boxes: what lies past the first is found already.
    rgb, (x0, y0, x1, y1) = line
    split = x0 + 0.25 * (x1 - x0)
    first, second = _box(x0 - 6, y0 - 6, split, y1 + 6), _box(split + 4, y0 - 6, x1 + 6, y1 + 6)
    polygons = lengthened(engine, rgb, [first, second])
    for polygon, box in zip(polygons, (first, second), strict=True):
        np.testing.assert_array_equal(polygon, box.polygon)


def test_only_a_clear_letter_or_digit_past_the_end_counts() -> None:
    # A crop 300 columns wide whose last (or, at the line's start, first) 100 are past the
    # box: characters read there count when they are letters or digits read clearly.
    inside, past = ("S", 0.99, 150.0), ("F", 0.95, 260.0)
    assert not _reads_past([inside], 300, 1, 100.0)
    assert _reads_past([inside, past], 300, 1, 100.0)
    assert not _reads_past([inside, ("F", 0.6, 260.0)], 300, 1, 100.0)  # unclear
    assert not _reads_past([inside, ("。", 0.99, 260.0)], 300, 1, 100.0)  # punctuation
    assert _reads_past([("東", 0.95, 40.0), inside], 300, -1, 100.0)  # before the start
    assert not _reads_past([past], 300, -1, 100.0)  # past the far end, not the start
