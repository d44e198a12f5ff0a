"""The text mask: a box is where to look; the text's strokes (and a margin) are filled."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from tests.support.render import LATIN_FONT, mug_scene, with_text
from zimage_stream.erase.masks import _dilated_convex, _text_groups, composite, dilated, text_mask
from zimage_stream.erase.ocr import TextBox

#: how far from a stroke a hugging mask may reach (margin, then the feather)
HUG_PX = 12


def _box(centre: tuple[float, float], length: float, height: float, degrees: float) -> TextBox:
    """A text line's box, rotated about its centre; corners clockwise from top-left."""
    half = np.array([[-length, -height], [length, -height], [length, height], [-length, height]])
    turn = np.radians(degrees)
    rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    return TextBox((half / 2 @ rotation.T + centre).astype(np.float32), "", 1.0)


def _box_around(strokes: np.ndarray, pad: int = 4) -> TextBox:
    """An axis-aligned detector box around ``strokes``."""
    ys, xs = np.nonzero(strokes)
    x0, y0, x1, y1 = xs.min() - pad, ys.min() - pad, xs.max() + pad, ys.max() + pad
    return TextBox(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float32), "", 1.0)


def _distance(strokes: np.ndarray) -> np.ndarray:
    return cv2.distanceTransform((~strokes).astype(np.uint8), cv2.DIST_L2, 5)


@pytest.mark.parametrize(
    ("colour", "opacity"),
    [((20, 20, 20), 1.0), ((240, 240, 240), 1.0), ((30, 30, 30), 0.55)],
    ids=["dark", "light", "translucent"],
)
def test_a_line_across_a_product_is_masked_and_its_outline_is_not(
    colour: tuple[int, int, int], opacity: float
) -> None:
    # The line starts on the backdrop and runs over the mug's left edge onto its body; the
    # grown box takes in the edge, the mask must not: the outline away from the strokes
    # stays out of it.
    mug, outline = mug_scene()
    drawn = with_text(mug, [("SALE 50% OFF", (120, 150), LATIN_FONT, 40, colour)])
    image = Image.blend(mug, drawn.image, opacity)
    strokes = (np.asarray(image) != np.asarray(mug)).any(-1)
    layer = text_mask(np.asarray(image), [_box_around(strokes)])
    assert layer.hard.astype(bool)[strokes].all(), "a stroke is outside the mask"
    far = _distance(strokes) > HUG_PX
    assert not (layer.soft > 0)[far & outline].any(), "the mug's outline was taken in"
    assert not (layer.soft > 0)[far].any(), "the mask reaches away from the strokes"


def test_outlined_text_is_masked_with_its_outline() -> None:
    # A red fill inside a white outline: both stand out of the backdrop, both are masked.
    mug, _ = mug_scene()
    image = mug.copy()
    font = ImageFont.truetype(str(LATIN_FONT), 44)
    ImageDraw.Draw(image).text(
        (40, 40), "NEW", font=font, fill=(200, 20, 20), stroke_width=3, stroke_fill="white"
    )
    strokes = (np.asarray(image) != np.asarray(mug)).any(-1)
    layer = text_mask(np.asarray(image), [_box_around(strokes)])
    assert layer.hard.astype(bool)[strokes].all()
    assert not (layer.soft > 0)[_distance(strokes) > HUG_PX].any()
    assert layer.unsure == 0 and layer.whole is None  # nothing filled whole


def _grain(seed: int, spread: float = 22.0) -> Image.Image:
    """Coarse grain (a few pixels across) on mid grey, 640 x 360."""
    rng = np.random.default_rng(seed)
    grain = cv2.resize(rng.normal(0, spread, (90, 160)).astype(np.float32), (640, 360))
    return Image.fromarray(np.clip(140 + grain[..., None] * [1, 1, 1], 0, 255).astype(np.uint8))


def _faint_on_grain(
    seed: int, text: str, at: tuple[int, int], size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Faint grey Latin text half blended onto coarse grain, and its stroke pixels."""
    scene = _grain(seed)
    drawn = with_text(scene, [(text, at, LATIN_FONT, size, (110, 110, 110))])
    image = Image.blend(scene, drawn.image, 0.5)
    strokes = (np.asarray(image) != np.asarray(scene)).any(-1) & drawn.strokes
    return np.asarray(image), strokes


def _filled_past_ends(hard: np.ndarray, box: TextBox) -> float:
    """How far (px) ``hard`` reaches past a level box's left or right end."""
    x0, x1 = box.polygon[:, 0].min(), box.polygon[:, 0].max()
    columns = np.nonzero(hard.any(0))[0]
    return float(max(x0 - columns.min(), columns.max() - x1))


def test_text_that_cannot_be_told_from_grain_is_filled_with_its_whole_box() -> None:
    # Faint text on coarse grain: the separation is unsure, so the whole box is the mask
    # (every stroke in it), not a scatter of grain pixels; and only the box, not the
    # larger area searched around it nor, across the line, past the box's own long
    # sides: a detector's box is taller than its text (here by a third of it).
    image, strokes = _faint_on_grain(1, "Free shipping", (200, 160), 24)
    box = _box_around(strokes, pad=8)
    layer = text_mask(image, [box])
    assert layer.unsure == 1 and layer.hard.astype(bool)[strokes].all()
    x0, y0 = box.polygon.min(0).astype(int)
    x1, y1 = box.polygon.max(0).astype(int)
    assert layer.hard[y0 + 4 : y1 - 4, x0:x1].all(), "the whole box is filled"
    rows = np.nonzero(layer.hard.any(1))[0]
    assert y0 - rows.min() <= 1 and rows.max() - y1 <= 1, "the fill is wider than the box"
    reach = np.nonzero((layer.soft > 0).any(1))[0]
    assert y0 - reach.min() <= 5 and reach.max() - y1 <= 5, "the feather reaches past the box"
    # The mask says which of its pixels were filled whole: here all of them.
    assert layer.whole is not None and np.array_equal(layer.whole, layer.hard > 0)


def test_a_large_line_filled_whole_leaves_the_grain_around_its_text() -> None:
    # A detector's box around a large line is taller than its text by about a fifth of its
    # height on each side (DB grows the text's core back); filled whole, the grain there
    # went with it. A box 100 px or higher is narrowed by a fifth of its height, not a
    # smaller line's tenth, and still covers every stroke.
    image, strokes = _faint_on_grain(2, "SALE 50%", (60, 120), 80)
    box = _box_around(strokes, pad=24)
    assert box.height >= 100 and box.is_line
    layer = text_mask(image, [box])
    assert layer.unsure == 1 and layer.hard.astype(bool)[strokes].all()
    text_rows, rows = np.nonzero(strokes.any(1))[0], np.nonzero(layer.hard.any(1))[0]
    beyond = max(text_rows.min() - rows.min(), rows.max() - text_rows.max())
    assert beyond <= 0.12 * box.height, f"filled {beyond} px above or below the text"
    # Level, it is lengthened at its ends by a quarter of its height, not by a half (the
    # fill then grows by its margin).
    past = _filled_past_ends(layer.hard, box)
    assert past <= 0.4 * box.height, f"filled {past} px past the box's ends"


def test_a_level_line_filled_whole_is_lengthened_by_a_quarter_of_its_height() -> None:
    # From 50 px high a level line's box is lengthened past its ends by a quarter of its
    # height, not a half: its text does not run that far past it.
    image, strokes = _faint_on_grain(3, "Free shipping", (150, 150), 44)
    box = _box_around(strokes, pad=12)
    assert 50 <= box.height < 100 and box.slant == 0
    layer = text_mask(image, [box])
    assert layer.unsure == 1 and layer.hard.astype(bool)[strokes].all()
    past = _filled_past_ends(layer.hard, box)
    assert past <= 0.4 * box.height, f"filled {past} px past the box's ends"


@pytest.mark.parametrize(
    ("degrees", "slant"), [(0.0, 0.0), (2.0, 2.0), (-25.0, 25.0), (90.0, 90.0), (180.0, 0.0)]
)
def test_a_box_says_how_far_its_line_runs_from_level(degrees: float, slant: float) -> None:
    assert _box((300, 200), 240, 60, degrees).slant == pytest.approx(slant, abs=1e-3)


def test_a_thin_last_glyph_past_the_box_is_still_masked() -> None:
    # Detector boxes often stop short of a thin last glyph ("-", "一"): the area searched
    # goes on along the line, so a dash just past the box's end is masked.
    mug, _ = mug_scene()
    drawn = with_text(mug, [("SALE-", (60, 40), LATIN_FONT, 36, (20, 20, 20))])
    strokes = (np.asarray(drawn.image) != np.asarray(mug)).any(-1)
    word = with_text(mug, [("SALE", (60, 40), LATIN_FONT, 36, (20, 20, 20))]).strokes
    layer = text_mask(np.asarray(drawn.image), [_box_around(word, pad=0)])
    assert layer.hard.astype(bool)[strokes].all()


@pytest.mark.parametrize("degrees", [0.0, 25.0, -30.0, 90.0])
def test_a_rotated_line_is_masked_whole(degrees: float) -> None:
    mug, _ = mug_scene()
    layer = Image.new("L", mug.size, 0)
    ImageDraw.Draw(layer).text(
        (200, 160), "LIMITED", fill=255, font=ImageFont.truetype(str(LATIN_FONT), 28)
    )
    layer = layer.rotate(degrees, Image.Resampling.BICUBIC, center=(270, 175))
    alpha = np.asarray(layer, np.float32)[..., None] / 255
    pixels = np.asarray(mug, np.float32) * (1 - alpha) + np.array([250, 250, 250]) * alpha
    image = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
    strokes = (image != np.asarray(mug)).any(-1)
    ys, xs = np.nonzero(strokes)
    centre = ((xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2)
    box = _box(centre, 190, 30, -degrees)  # PIL turns anticlockwise, y points down
    hard = text_mask(image, [box]).hard.astype(bool)
    assert hard[strokes].all()


def test_outside_the_feather_nothing_changes() -> None:
    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)
    filled = np.zeros_like(original)
    layer = text_mask(original, [_box((150.0, 100.0), 80.0, 20.0, 10.0)])
    out = composite(original, filled, layer.soft)
    assert np.array_equal(out[layer.soft == 0], original[layer.soft == 0])
    assert np.array_equal(out[layer.hard > 0], filled[layer.hard > 0])
    feather = (layer.soft > 0) & (layer.soft < 1)
    assert feather.any(), "the mask's edge is feathered"


def test_a_mask_is_the_same_whatever_was_clustered_before() -> None:
    # k-means++ starts from OpenCV's random generator: unseeded, an image's mask (and so the
    # erased image a replay writes) depended on what the process had erased before it. A
    # gradient's ring is a continuum of colours, where k-means settles differently with
    # each start.
    rng = np.random.default_rng(0)
    ramp = np.linspace(-40, 40, 640, dtype=np.float32)[None, :, None]
    pixels = np.array([150, 110, 170], np.float32) + ramp + rng.normal(0, 3, (360, 640, 3))
    scene = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    drawn = with_text(scene, [("SALE 50% OFF", (60, 150), LATIN_FONT, 56, (105, 65, 125))])
    image = np.asarray(Image.blend(scene, drawn.image, 0.6))
    masks = []
    for draw in range(4):
        other = np.random.default_rng(draw).random((500, 3)).astype(np.float32)
        criteria = (cv2.TERM_CRITERIA_MAX_ITER, 5, 1.0)
        cv2.kmeans(other, 3, None, criteria, draw + 1, cv2.KMEANS_PP_CENTERS)
        masks.append(text_mask(image, [_box_around(drawn.strokes)]).hard)
    assert all(np.array_equal(masks[0], mask) for mask in masks[1:])


def test_grain_around_clear_text_is_mostly_left_alone() -> None:
    # Dark text on coarse grain stands out clearly, so its pixels are masked, not its box;
    # but some of the grain's own pixels stand out of the ring too, scattered over the
    # area. A group of them is masked only when a pixel of it stands out as much as text
    # does (the darkest grain can): on these eight scenes that masked 7-15 % of the grain
    # around the text farther than 12 px from a stroke, against 22-34 % when every group
    # was masked.
    shares = []
    for seed in range(1, 9):
        drawn = with_text(
            _grain(seed), [("SALE 50% OFF", (120, 150), LATIN_FONT, 56, (15, 15, 15))]
        )
        box = _box_around(drawn.strokes)
        layer = text_mask(np.asarray(drawn.image), [box])
        assert layer.whole is None and layer.hard.astype(bool)[drawn.strokes].all()
        x0, y0 = box.polygon.min(0).astype(int) - 20
        x1, y1 = box.polygon.max(0).astype(int) + 20
        around = np.zeros(drawn.strokes.shape, bool)
        around[y0:y1, x0:x1] = True
        far = around & (_distance(drawn.strokes) > HUG_PX)
        shares.append((layer.soft > 0)[far].mean())
    assert np.mean(shares) < 0.15 and max(shares) < 0.2, shares


def test_faint_text_on_a_clean_background_is_masked_by_its_strokes() -> None:
    # A watermark barely off a flat backdrop (11 levels in one channel): its pixels stand
    # out only a little over the floor threshold, which on a busy background would make
    # the separation unsure; on a flat one nothing else stands out at all, so it is the
    # text, masked by its strokes and not by its whole box.
    scene = Image.new("RGB", (640, 360), (150, 150, 150))
    drawn = with_text(scene, [("Free shipping", (200, 160), LATIN_FONT, 28, (150, 150, 130))])
    image = Image.blend(scene, drawn.image, 0.55)
    strokes = (np.asarray(image) != np.asarray(scene)).any(-1)
    layer = text_mask(np.asarray(image), [_box_around(strokes)])
    assert layer.whole is None and layer.unsure == 0
    assert layer.hard.astype(bool)[strokes].all()
    assert not (layer.soft > 0)[_distance(strokes) > HUG_PX].any()


def test_text_outside_where_it_may_be_is_left_alone() -> None:
    mug, _ = mug_scene()
    drawn = with_text(
        mug,
        [
            ("SALE", (40, 40), LATIN_FONT, 36, (20, 20, 20)),
            ("NEW", (40, 280), LATIN_FONT, 36, (20, 20, 20)),
        ],
    )
    image = np.asarray(drawn.image)
    top = drawn.strokes.copy()
    top[180:] = False
    bottom = drawn.strokes & ~top
    boxes = [_box_around(top), _box_around(bottom)]
    within = np.zeros(top.shape, bool)
    within[:180] = True
    layer = text_mask(image, boxes, within)
    assert layer.hard.astype(bool)[top].all()
    assert not (layer.soft > 0)[200:].any(), "text outside `within` was masked"
    assert text_mask(image, boxes, np.zeros(top.shape, bool)).empty


def test_what_stands_out_past_the_box_in_another_colour_is_not_the_text() -> None:
    # A white line on a pink mug, its area reaching past the detector's box: a white dash
    # there is the line's last glyph; the mug's dark handle there is the picture.
    rgb = np.full((120, 400, 3), (210, 140, 170), np.uint8)
    core = np.zeros((120, 400), bool)
    core[40:80, 100:300] = True
    text = np.zeros((120, 400), bool)
    for left in range(110, 290, 30):  # the line's glyphs, inside the box
        text[45:75, left : left + 12] = True
    text[58:62, 305:325] = True  # a dash just past the box's end
    text[30:90, 60:75] = True  # the handle, past the box's other end
    rgb[text] = (250, 250, 250)
    rgb[30:90, 60:75] = (120, 40, 80)
    line = np.zeros((120, 400), bool)
    line[40:80, 80:320] = True  # the box lengthened at both ends
    kept = _text_groups(rgb, text, core, line, None, same=32.0)
    assert kept[45:75, 110:290].sum() == text[45:75, 110:290].sum()  # the line
    assert kept[58:62, 305:325].all()  # its dash
    assert not kept[30:90, 60:75].any()  # not the handle
    # A group that reaches into the box is the text's whatever its colour (an outline).
    text[30:90, 75:101] = True
    rgb[30:90, 75:101] = (120, 40, 80)
    assert _text_groups(rgb, text, core, line, None, same=32.0)[30:90, 60:75].all()


def test_what_stands_out_only_beside_the_box_or_faintly_on_grain_is_not_the_text() -> None:
    # Dark grain specks around a dark line on grain: a speck beside the box, in the text's
    # colour, is the grain's, and so is one in the box none of which stands out clearly.
    rgb = np.full((120, 400, 3), (200, 120, 150), np.uint8)
    core = np.zeros((120, 400), bool)
    core[40:80, 100:300] = True
    line = np.zeros((120, 400), bool)
    line[40:80, 80:320] = True
    text = np.zeros((120, 400), bool)
    for left in range(110, 290, 30):
        text[45:75, left : left + 12] = True
    text[10:16, 150:156] = True  # a speck above the box
    text[60:64, 125:128] = True  # a faint speck between two glyphs
    rgb[text] = (90, 20, 50)
    strong = text.copy()
    strong[60:64, 125:128] = False
    kept = _text_groups(rgb, text, core, line, strong, same=32.0)
    assert kept[45:75, 110:290].sum() == (text[45:75, 110:290].sum() - 12)  # the glyphs
    assert not kept[10:16, 150:156].any()
    assert not kept[60:64, 125:128].any()
    # On a clean background (no hysteresis) the faint speck is the text's.
    assert _text_groups(rgb, text, core, line, None, same=32.0)[60:64, 125:128].all()


def test_a_line_read_as_text_that_does_not_stand_out_is_filled_whole() -> None:
    # Dark yellow text on a yellow backdrop above a product's black shadow: its colour is a
    # mixture of the two (which an edge between them has too), so nothing stands out of
    # the ring. A box that reads as text is filled whole all the same; one that reads as
    # nothing (a product's part boxed) is left alone.
    yellow = np.array([225, 200, 110], np.float32)
    rgb = np.broadcast_to(yellow, (240, 640, 3)).copy()
    rgb[130:150] = 40  # the shadow, below the line
    scene = Image.fromarray(rgb.astype(np.uint8))
    dark = (132, 120, 75)  # halfway between the yellow and the shadow
    drawn = with_text(scene, [("BEST SELLER", (120, 60), LATIN_FONT, 48, dark)])
    image, box = np.asarray(drawn.image), _box_around(drawn.strokes)
    read = text_mask(image, [TextBox(box.polygon, "BEST SELLER", 1.0)])
    assert read.unsure == 1 and read.hard.astype(bool)[drawn.strokes].all()
    unread = text_mask(image, [box])
    assert unread.unsure == 0 and unread.hard.astype(bool)[drawn.strokes].mean() < 0.1


@pytest.mark.parametrize("degrees", [0.0, 7.0, 33.0, 81.0])
@pytest.mark.parametrize("by", [1, 4, 13, 40])
def test_a_box_is_grown_as_a_round_kernel_grows_it(degrees: float, by: int) -> None:
    # A box's area and its ring are grown a row's run at a time: the same pixels as
    # OpenCV's dilation, thin boxes and boxes cut off by the crop's edge included.
    for centre, length, height in [((200, 150), 300, 40), ((30, 20), 220, 3), ((380, 290), 90, 70)]:
        canvas = np.zeros((300, 400), np.uint8)
        polygon = np.round(_box(centre, length, height, degrees).polygon).astype(np.int32)
        cv2.fillPoly(canvas, [polygon], 255)
        assert np.array_equal(_dilated_convex(canvas, by), dilated(canvas, by))
