"""Masks over text: what gets inpainted, and the feathered edge that blends it back.

A detector box is a region to look in, not the region to fill. Each box is lengthened at
both ends of its line (detector boxes often stop short of a thin last glyph: "一", "-",
".") and grown by a share of its text height on every side; that *area* holds the whole
line. Inside it the text's pixels are told from their background (``_separate``): the
colours just outside the area (its *ring*) are the background, clustered, with the
mixtures of any two of them (a product's anti-aliased outline, a gradient) counted as
background too, and a pixel that is further from all of that than the ring's own pixels
are from it is text. That holds for solid, outlined and translucent text alike, and a
line laid across a product leaves the product's outline alone. The text pixels plus a
small margin (anti-aliased and JPEG-blurred stroke edges) are filled, feathered by a few
pixels. On a clean background (the ring's spread at its floor) whatever stands out is
text, however little of it there is and however faintly, so a box with nothing on it (a
product's handle read as a glyph) is left alone. On a busy one (grain), a few of the
background's own pixels stand out too, scattered around the text: a group of text pixels
is kept only when some of it stands out clearly (hysteresis, as in Canny's edges), so
grain specks are not filled. A detector's box covers its glyphs across the line, so a
group that stands out only beside the box (in the area's growth, not in the box or past
its ends) is grain or a product's part, and is left alone. The area reaches past the
detector's box to take a line's last thin glyph, which has the text's colour: a group
standing out there wholly outside the box, in a colour unlike the text's inside it, is
the picture (a product's handle beside a line laid across the product) and is left alone
(``_text_groups``). Where the separation is unsure (too little contrast against the
ring's own spread, as for faint text on grain, or nothing, or most of the area, standing
out; or, in a box that reads as text, what stands out covering under half of its line's
length: a line in a mixture of two of the ring's colours) the detector's box is filled
whole, lengthened at the line's ends, narrowed by a tenth of the text height on its long
sides (a detector's box is taller than its text; only a line's box, at least twice as
long as high: a glyph's may be tight at the line's end; a large line's box, 100 px or
higher, by a fifth of it; a level line's, 50 px or higher, lengthened only by a quarter
of it) and grown by a fortieth, with the same margin and feather as strokes: not the
grown area, whose growth is room to look in (the box already covers whole glyphs) and,
filled, only damaged the picture around the text.

``hard`` (uint8, 0/255) is what gets inpainted; ``soft`` (float32, 0..1) composites the
result back: 1 over the hard mask, falling to exactly 0 a few pixels outside it, so
pixels away from the text are unchanged bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .ocr import TextBox

GROW_SHARE = 0.25  # of the text height, on every side
LINE_END_SHARE = 0.5  # of the text height, at both ends of the line
MIN_GROW_PX = 3
#: the background sample: a ring this wide (a share of the text height, at least) around
#: the area, at least this many pixels of it
RING_SHARE = 0.25
MIN_RING_PX = 4
MIN_RING_SAMPLE = 32
#: the ring's colours are clustered into this many (k-means, its generator seeded so)
RING_COLOURS = 3
KMEANS_SEED = 16
#: a text pixel is further from the ring's colours than RING_SPREADS times the distance
#: within which RING_QUANTILE % of the ring's pixels stay, and at least MIN_CONTRAST ...
RING_QUANTILE = 95.0
RING_SPREADS = 1.5
MIN_CONTRAST = 8.0
#: ... and the separation is sure when the text pixels' median distance is this many
#: times that threshold (not asked on a clean background, the threshold at its floor)
#: and they make up a share of the area within these bounds; on a busy background a
#: group of text pixels none of which stands out this much is the background's
SURE_RATIO = 1.6
SURE_SHARE = (0.01, 0.6)
#: text pixels outside the detector's box are the text's only when their group's colour
#: lies within this many times the threshold (at least SAME_MIN levels) of one of the
#: TEXT_COLOURS that the text's pixels inside the box cluster into
SAME_SPREADS = 2.0
SAME_MIN = 32.0
TEXT_COLOURS = 2
#: a box that reads as READ_MIN_CHARS or more characters holds a line of text: when what
#: stands out in it covers under MIN_COVERED of its length, its text did not stand out
#: (a line whose colour is a mixture of two of the ring's: dark yellow between a yellow
#: backdrop and a product's shadow), and it is filled whole
READ_MIN_CHARS = 2
MIN_COVERED = 0.5
#: text pixels are filled with this margin (a share of the text height, at least: at 3 px
#: the faint anti-aliased edges of two small lines on the bench stayed outside, 98.4 and
#: 98.6 % of their strokes masked) and feathered by this much; a box filled whole, which
#: holds whole glyphs already, takes the smaller least margin
MARGIN_SHARE = 0.06
MIN_MARGIN_PX = 4
MIN_BOX_MARGIN_PX = 3
FEATHER_PX = 3
#: unsure, the box is filled whole, grown by this share of the text height (not the
#: area's growth: that is room to look in, and filled it only damaged the picture; a
#: twentieth changed more of the picture around faint text on grain; not grown at all,
#: a faint rotated line lost its edge to the bench's 99 % rule) ...
BOX_GROW_SHARE = 0.025
#: ... after narrowing it by this share on each long side: a detector box is taller than
#: its text (DB's boxes are its text's core grown back by a ratio, some of it background).
#: Only a line's box (``TextBox.is_line``) is narrowed: a short one (a glyph or two) may
#: run across its line as well as along it
BOX_NARROW_SHARE = 0.1
#: A line's box LARGE_BOX_PX or higher is narrowed by more: on the bench such a box holds
#: at least 0.106 of its height of picture on each side of its text (a fifth at the median;
#: under 100 px, 5 % of boxes hold under 0.09), and the narrowing less the growth and the
#: margin (0.115 of it) stays within a hundredth of its height of that (a box tilted
#: against its level line leaves an "i"'s dot's tip: 99.45 % of that line masked, not
#: 99.66 %; 0.22 left more, 99.11 % of another)
BOX_NARROW_LARGE_SHARE = 0.2
LARGE_BOX_PX = 100
#: A line's box LEVEL_END_PX or higher filled whole, its line running level (within
#: LEVEL_DEGREES), is lengthened by this share of its height, not LINE_END_SHARE: on the
#: bench a level line's text ran at most 0.17 of its box's height past the box's ends at
#: that size (a smaller line's, up to 0.39: a glyph the box missed), while a rotated
#: line's box stops short of its text farther
LEVEL_LINE_END_SHARE = 0.25
LEVEL_END_PX = 50
LEVEL_DEGREES = 3.0


@dataclass(frozen=True)
class TextMask:
    hard: np.ndarray
    soft: np.ndarray
    #: areas whose box was filled whole, their text not told from its background ...
    unsure: int = 0
    #: ... and what of ``hard`` they make up (bool; None: nothing filled whole)
    whole: np.ndarray | None = None

    @property
    def empty(self) -> bool:
        return not self.hard.any()


@dataclass(frozen=True)
class _Area:
    """One box's lengthened and grown area, in a crop of the image around it."""

    crop: tuple[slice, slice]
    inside: np.ndarray  # uint8 0/255, the crop's size
    box: np.ndarray  # the box lengthened and narrowed (what is filled whole), likewise
    height: float
    core: np.ndarray  # the detector's box as it is, likewise
    line: np.ndarray  # the box lengthened, not grown, likewise
    #: the unit vector (x, y) along the box's line, and whether the box reads as text
    #: (READ_MIN_CHARS or more characters recognised in it)
    along: np.ndarray
    reads: bool

    def whole(self) -> np.ndarray:
        """What is filled when the text cannot be told from its background: the box,
        barely grown."""
        return dilated(self.box, round(BOX_GROW_SHARE * self.height))


def text_mask(rgb: np.ndarray, boxes: list[TextBox], within: np.ndarray | None = None) -> TextMask:
    """The hard and feathered masks over the text in ``boxes`` of ``rgb`` (H, W, 3 uint8).

    ``within`` (H, W bool), when given, is where text may be: what a box finds outside it
    (before the margin) is left alone. The eraser's second look uses it to fill only
    around what the first filled.
    """
    shape = rgb.shape[:2]
    areas = [area for box in boxes if (area := _area(shape, box)) is not None]
    occupied = np.zeros(shape, dtype=np.uint8)
    for area in areas:
        occupied[area.crop] = np.maximum(occupied[area.crop], area.inside)
    hard = np.zeros(shape, dtype=np.uint8)
    soft = np.zeros(shape, dtype=np.float32)
    wholes = np.zeros(shape, dtype=bool)
    unsure = 0
    for area in areas:
        if within is not None and not within[area.crop].any():
            continue  # nothing it finds could be filled
        text, whole = _separate(rgb[area.crop], area, occupied[area.crop])
        if within is not None:
            text, whole = (np.where(within[area.crop], part, 0) for part in (text, whole))
        filled_whole = bool(whole.any())
        least = MIN_BOX_MARGIN_PX if filled_whole else MIN_MARGIN_PX
        margin = max(least, round(MARGIN_SHARE * area.height))
        filled = dilated(np.maximum(text, whole), margin)  # one of them is empty
        if filled_whole:
            unsure += 1
            wholes[area.crop] |= filled > 0
        hard[area.crop] = np.maximum(hard[area.crop], filled)
        soft[area.crop] = np.maximum(soft[area.crop], _feathered(filled, FEATHER_PX))
    return TextMask(hard=hard, soft=soft, unsure=unsure, whole=wholes if unsure else None)


def _area(shape: tuple[int, int], box: TextBox) -> _Area | None:
    """``box`` lengthened along its line and grown, in a crop with room for its ring and
    its feather; None for a box with no area."""
    grow = max(MIN_GROW_PX, round(GROW_SHARE * box.height))
    ring = max(MIN_RING_PX, round(RING_SHARE * box.height))
    lengthened = _resized(box.polygon, LINE_END_SHARE * box.height)
    polygon = np.round(lengthened).astype(np.int32)
    x, y, w, h = cv2.boundingRect(polygon)
    pad = grow + max(ring, grow) + 2
    y0, x0 = max(0, y - pad), max(0, x - pad)
    y1, x1 = min(shape[0], y + h + pad), min(shape[1], x + w + pad)
    if x1 <= x0 or y1 <= y0:
        return None
    origin = np.array([x0, y0], np.int32)
    inside = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
    cv2.fillPoly(inside, [polygon - origin], 255)
    if not inside.any():
        return None
    narrowed = np.round(_resized(box.polygon, _line_end(box), -_narrowing(box)))
    whole = np.zeros_like(inside)
    cv2.fillPoly(whole, [narrowed.astype(np.int32) - origin], 255)
    core = np.zeros_like(inside)
    cv2.fillPoly(core, [np.round(box.polygon).astype(np.int32) - origin], 255)
    reads = len("".join(box.text.split())) >= READ_MIN_CHARS
    along, _ = _axes(box.polygon)
    return _Area(
        np.s_[y0:y1, x0:x1],
        _dilated_convex(inside, grow),
        whole,
        box.height,
        core,
        inside,
        along / max(float(np.linalg.norm(along)), 1e-6),
        reads,
    )


def _dilated_convex(mask: np.ndarray, by: int) -> np.ndarray:
    """``dilated(mask, by)`` for a convex ``mask`` (uint8 0/255: one run of pixels in a row,
    its rows one after another), the same to the pixel, a row's run at a time: a round
    kernel's row ``dy`` widens row ``y - dy``'s run by its half-width, and the runs so
    widened overlap, so a row of the result is one run too. OpenCV's dilation by a round
    kernel of radius 24 took 7 ms on a box's area; this takes a tenth of it."""
    if by <= 0:
        return mask.copy()
    height, width = mask.shape
    filled = mask > 0
    rows = filled.any(1)
    far = 1 << 30
    first = np.where(rows, filled.argmax(1), far)
    last = np.where(rows, width - 1 - filled[:, ::-1].argmax(1), -far)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * by + 1, 2 * by + 1))
    halves = (kernel.sum(1).astype(np.int64) - 1) // 2  # row dy = i - by
    start, stop = np.full(height, far), np.full(height, -far)
    for i, half in enumerate(halves):
        dy = i - by
        # Row y of the result takes row y - dy of the mask.
        to, source = (
            slice(max(0, dy), min(height, height + dy)),
            slice(max(0, -dy), min(height, height - dy)),
        )
        np.minimum(start[to], first[source] - half, out=start[to])
        np.maximum(stop[to], last[source] + half, out=stop[to])
    columns = np.arange(width)
    grown = (columns >= start[:, None]) & (columns <= stop[:, None])
    return grown.astype(np.uint8) * 255


def _covered(text: np.ndarray, core: np.ndarray, along: np.ndarray) -> float:
    """The share of ``core``'s length (along ``along``) that ``text`` pixels in it cover: a
    line's glyphs cover most of it, the gaps between them and between words little."""
    ys, xs = np.nonzero(core)
    if len(xs) == 0:
        return 0.0
    position = np.round(xs * along[0] + ys * along[1]).astype(np.int64)
    start, length = int(position.min()), int(position.max() - position.min()) + 1
    inner = text[ys, xs]
    covered = np.zeros(length, bool)
    covered[position[inner] - start] = True
    return float(covered.mean())


def _line_end(box: TextBox) -> float:
    """How much a box filled whole is lengthened at each end of its line (px)."""
    level = box.is_line and box.height >= LEVEL_END_PX and box.slant <= LEVEL_DEGREES
    return (LEVEL_LINE_END_SHARE if level else LINE_END_SHARE) * box.height


def _narrowing(box: TextBox) -> float:
    """How much a box filled whole is narrowed on each long side (px)."""
    if not box.is_line:
        return 0.0
    share = BOX_NARROW_LARGE_SHARE if box.height >= LARGE_BOX_PX else BOX_NARROW_SHARE
    return share * box.height


def _separate(rgb: np.ndarray, area: _Area, occupied: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The text's pixels in ``area``, or its whole box when its text cannot be told from
    the background with confidence: (text, whole), uint8 0/255, one of them empty."""
    ring_px = max(MIN_RING_PX, round(RING_SHARE * area.height))
    ring = (_dilated_convex(area.inside, ring_px) > 0) & (occupied == 0)
    inside = area.inside > 0
    nothing = np.zeros(inside.shape, np.uint8)
    if ring.sum() < MIN_RING_SAMPLE:
        return nothing, area.whole()
    distance, threshold = _colour_distance(rgb, ring, inside)
    text = inside & (distance > threshold)
    if area.reads and _covered(text, area.core > 0, area.along) < MIN_COVERED:
        return nothing, area.whole()  # read as text, but its text did not stand out
    share = text.sum() / inside.sum()
    clean = threshold <= MIN_CONTRAST
    if clean and share < SURE_SHARE[0]:
        return text.astype(np.uint8) * 255, nothing  # a clean background, little on it
    if not SURE_SHARE[0] <= share <= SURE_SHARE[1]:
        return nothing, area.whole()
    if not clean and np.median(distance[text]) < SURE_RATIO * threshold:
        return nothing, area.whole()
    strong = None if clean else distance > SURE_RATIO * threshold
    same = max(SAME_MIN, SAME_SPREADS * threshold)
    text = _text_groups(rgb, text, area.core > 0, area.line > 0, strong, same)
    return text.astype(np.uint8) * 255, nothing


def _text_groups(
    rgb: np.ndarray,
    text: np.ndarray,
    core: np.ndarray,
    line: np.ndarray,
    strong: np.ndarray | None,
    same: float,
) -> np.ndarray:
    """The connected groups (8-connected) of ``text`` that are the text's, labelled once:

    * on a busy background (``strong`` given), only a group that holds a pixel standing
      out clearly (hysteresis: grain specks stand out a little);
    * only a group that reaches into ``line``, the box lengthened but not grown: a box
      covers its glyphs across the line, so what stands out only beside it is grain or a
      product's part;
    * a group wholly outside the detector's box (``core``) only when it has the text's
      colour, within ``same`` of one of the colours the text's pixels inside the box
      cluster into (a fill and an outline, say): the area reaches past the box to take a
      line's last thin glyph, which has the text's colour; what else stands out there is
      the picture (a product's handle beside a line across the product)."""
    count, labels = cv2.connectedComponents(text.astype(np.uint8), connectivity=8)
    if count <= 1:
        return text
    keep = _touching(labels, count, text & line)
    if strong is not None:
        keep &= _touching(labels, count, text & strong)
    held = _touching(labels, count, text & core)
    inner = text & core & keep[labels]
    if (keep & ~held).any() and inner.sum() >= MIN_RING_SAMPLE:
        colours = colour_groups(rgb[inner].astype(np.float32), TEXT_COLOURS)
        groups, pixels = labels[text], rgb[text].astype(np.float64)
        sizes = np.maximum(np.bincount(groups, minlength=count), 1)
        means = np.stack(
            [np.bincount(groups, pixels[:, c], minlength=count) / sizes for c in range(3)], 1
        )
        apart = np.linalg.norm(means[:, None, :] - colours[None], axis=-1).min(1) > same
        keep &= held | ~apart
    kept: np.ndarray = keep[labels]
    return kept


def _touching(labels: np.ndarray, count: int, pixels: np.ndarray) -> np.ndarray:
    """Which of ``count`` groups (``labels``) hold a pixel of ``pixels``; group 0, the
    background, never."""
    touching = np.zeros(count, bool)
    touching[labels[pixels]] = True
    touching[0] = False
    return touching


def _colour_distance(
    rgb: np.ndarray, ring: np.ndarray, inside: np.ndarray
) -> tuple[np.ndarray, float]:
    """Every inside pixel's distance from the ring's colours, and the distance beyond which a
    pixel stands out of them: RING_SPREADS times the distance within which RING_QUANTILE
    of the ring's own pixels stay (a share, not the farthest, as a ring can hold a stray
    stroke), at least MIN_CONTRAST. The colours are taken as they are or less the colour
    plane that fits the ring best (a gradient's dark end is not text on its light end),
    whichever the ring fits more tightly."""
    best: tuple[np.ndarray, float] | None = None
    flat = rgb.astype(np.float32)
    for levelled in (False, True):  # levelled only when the plain colours are not tight
        pixels = _levelled(flat, ring) if levelled else flat
        ring_pixels = pixels[ring]
        colours = _colours(ring_pixels)
        sample = ring_pixels[:: max(1, len(ring_pixels) // 4000)]
        spread = float(np.percentile(_distance(sample, colours), RING_QUANTILE))
        threshold = max(MIN_CONTRAST, RING_SPREADS * spread)
        if best is None or threshold < best[1]:
            distance = np.zeros(ring.shape, np.float32)
            distance[inside] = _distance(pixels[inside], colours)
            best = (distance, threshold)
        if threshold <= MIN_CONTRAST:  # as tight as it gets: no need to level it
            break
    assert best is not None
    return best


def _levelled(pixels: np.ndarray, ring: np.ndarray) -> np.ndarray:
    """The crop's colours (float32) less the colour plane (a + b x + c y per channel) that
    fits the ring best."""
    ys, xs = np.nonzero(ring)
    design = np.stack([np.ones(len(xs)), xs, ys], 1).astype(np.float32)
    plane, *_ = np.linalg.lstsq(design, pixels[ring], rcond=None)
    height, width = ring.shape
    gy, gx = np.mgrid[0:height, 0:width].astype(np.float32)
    levelled: np.ndarray = pixels - gx[..., None] * plane[1] - gy[..., None] * plane[2]
    return levelled


def _colours(sample: np.ndarray) -> np.ndarray:
    """The background's main colours (k, 3): the ring's pixels clustered."""
    return colour_groups(sample, min(RING_COLOURS, len(sample)), attempts=2)


def colour_groups(pixels: np.ndarray, k: int, attempts: int = 1) -> np.ndarray:
    """The centres (k, 3) of ``pixels`` (n, 3) clustered by k-means, the same for the same
    pixels whatever ran before: k-means++ draws its first centres from OpenCV's random
    generator (one per thread), which is seeded here, so an image's mask and fill never
    depend on what the process erased before it."""
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 10, 1.0)
    step = max(1, len(pixels) // 2000)  # a subsample clusters the same, faster
    data = np.ascontiguousarray(pixels[::step], np.float32)
    labels = np.zeros((len(data), 1), np.int32)  # not read: the centres start k-means++
    cv2.setRNGSeed(KMEANS_SEED)
    _, _, centres = cv2.kmeans(data, k, labels, criteria, attempts, cv2.KMEANS_PP_CENTERS)
    return np.asarray(centres, np.float32)


def _distance(pixels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Each pixel's (n, 3) distance to the background: to the nearest of ``colours`` or of
    the mixtures (segments) between two of them."""
    first, second = np.triu_indices(len(colours))  # every pair, and each colour alone
    starts, spans = colours[first], colours[second] - colours[first]
    lengths = np.maximum((spans * spans).sum(1), 1e-6)
    # |p - a - t s|^2 with t = clip((p - a) . s / |s|^2, 0, 1), for every pair at once
    along = pixels @ spans.T - (starts * spans).sum(1)  # (p - a) . s
    t = np.clip(along / lengths, 0.0, 1.0)
    squared = (
        np.einsum("ij,ij->i", pixels, pixels)[:, None]
        - 2 * pixels @ starts.T
        + (starts * starts).sum(1)
        - 2 * t * along
        + t * t * lengths
    )
    # The nearest, a column at a time: numpy's min over a row of six is six times slower.
    nearest = squared[:, 0].copy()
    for column in range(1, squared.shape[1]):
        np.minimum(nearest, squared[:, column], out=nearest)
    distance: np.ndarray = np.sqrt(np.maximum(nearest, 0.0))
    return distance


def dilated(mask: np.ndarray, by: int) -> np.ndarray:
    """``mask`` (uint8) grown by ``by`` pixels on every side (a round kernel)."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * by + 1, 2 * by + 1))
    return cv2.dilate(mask, kernel)


def _resized(polygon: np.ndarray, longer: float, wider: float = 0.0) -> np.ndarray:
    """A four-corner box made ``longer`` pixels longer at both ends of its longer axis and
    ``wider`` pixels wider on both of its long sides (negative: shorter, narrower; a box
    is not narrowed past its middle)."""
    corners = polygon.astype(np.float32)
    along, across = _axes(corners)
    centre = corners.mean(0)
    for axis, by in ((along, longer), (across, wider)):
        size = float(np.linalg.norm(axis))
        if size == 0 or by == 0:
            continue
        sides = np.sign((corners - centre) @ axis)[:, None]
        by = max(by, -size / 2 + 0.5)  # not past the middle
        corners = corners + sides * (axis / size * by)
    return corners


def _axes(polygon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A four-corner box's sides from its first corner: (along its longer axis, across)."""
    corners = polygon.astype(np.float32)
    along, across = corners[1] - corners[0], corners[3] - corners[0]
    if np.linalg.norm(along) < np.linalg.norm(across):
        along, across = across, along
    return along, across


def _feathered(hard: np.ndarray, width: int) -> np.ndarray:
    if not hard.any():
        return np.zeros(hard.shape, dtype=np.float32)
    size = 2 * width + 1
    ring = dilated(hard, width)
    soft = cv2.GaussianBlur(ring.astype(np.float32) / 255.0, (size, size), width / 2)
    soft = np.maximum(soft, hard.astype(np.float32) / 255.0)
    soft[ring == 0] = 0.0  # exactly zero outside the feather ring
    return soft


def composite(original: np.ndarray, filled: np.ndarray, soft: np.ndarray) -> np.ndarray:
    """Blend ``filled`` into ``original`` through ``soft``; untouched where soft is 0."""
    out = original.copy()
    # Only where soft is above 0: the text areas can lie far apart, and what lies between
    # them (most of their bounding box, often) is left as it is anyway.
    at = soft > 0
    alpha = soft[at][:, None]
    blended = original[at].astype(np.float32) * (1 - alpha) + filled[at] * alpha
    out[at] = np.clip(np.round(blended), 0, 255).astype(np.uint8)
    return out
