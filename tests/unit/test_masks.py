"""The text mask's shape: lengthened along each line, grown with the text, feathered."""

from __future__ import annotations

import numpy as np
import pytest

from zimage_stream.erase.masks import GROW_SHARE, LINE_END_SHARE, composite, text_mask
from zimage_stream.erase.ocr import TextBox


def _box(centre: tuple[float, float], length: float, height: float, degrees: float) -> TextBox:
    """A text line's box, rotated about its centre; corners clockwise from top-left."""
    half = np.array([[-length, -height], [length, -height], [length, height], [-length, height]])
    turn = np.radians(degrees)
    rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    return TextBox((half / 2 @ rotation.T + centre).astype(np.float32), "", 1.0)


def _extent(hard: np.ndarray, centre: tuple[float, float], direction: np.ndarray) -> float:
    """How far the mask reaches from ``centre`` along ``direction`` (a unit vector)."""
    reach = 0.0
    for step in np.arange(0, max(hard.shape), 0.5):
        x, y = np.round(np.asarray(centre) + step * direction).astype(int)
        if not (0 <= x < hard.shape[1] and 0 <= y < hard.shape[0]) or not hard[y, x]:
            break
        reach = step
    return reach


@pytest.mark.parametrize("degrees", [0.0, 25.0, -30.0, 90.0])
def test_a_line_is_lengthened_at_both_ends_and_grown_across(degrees: float) -> None:
    # Detector boxes often stop short of a thin last glyph ("一", "-", "."): the mask goes
    # on along the line by half the text's height, at both ends, whatever the line's angle.
    centre, length, height = (400.0, 300.0), 200.0, 40.0
    box = _box(centre, length, height, degrees)
    hard = text_mask((600, 800), [box]).hard > 0
    turn = np.radians(degrees)
    along, across = np.array([np.cos(turn), np.sin(turn)]), np.array([-np.sin(turn), np.cos(turn)])
    grow = GROW_SHARE * height
    for direction in (along, -along):
        expected = length / 2 + LINE_END_SHARE * height + grow
        assert _extent(hard, centre, direction) == pytest.approx(expected, abs=2.5)
    for direction in (across, -across):
        assert _extent(hard, centre, direction) == pytest.approx(height / 2 + grow, abs=2.5)


def test_outside_the_feather_nothing_changes() -> None:
    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)
    filled = np.zeros_like(original)
    layer = text_mask((200, 300), [_box((150.0, 100.0), 80.0, 20.0, 10.0)])
    out = composite(original, filled, layer.soft)
    assert np.array_equal(out[layer.soft == 0], original[layer.soft == 0])
    assert np.array_equal(out[layer.hard > 0], filled[layer.hard > 0])
    feather = (layer.soft > 0) & (layer.soft < 1)
    assert feather.any(), "the mask's edge is feathered"
