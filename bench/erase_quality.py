"""Erase accuracy and fidelity on a seeded, stratified synthetic set of product-like images.

Each image gets 2-3 text instances with known stroke pixels, drawn from strata of
background (plain, gradient, texture, photo), language (zh, en, mixed), size (12-96 px),
contrast (high, low), translucency (opaque, translucent), rotation (none, rotated), JPEG
quality (lossless, q90, q60) and product object: about two images in three hold a
product (a shaded mug-like body with a handle and crisp edges), and one of their lines
is placed across it or across its outline; each instance's ``object`` stratum says where
it ended up (``none``: off the product, ``on``: inside it, ``edge``: across its outline).

An instance counts as erased only if at least 99 % of its stroke pixels lie inside the
final mask *and* a verifier OCR (RapidOCR's own default pipeline, which filters by
recognition score, unlike the eraser's detector-first call) finds nothing covering 30 %
or more of its box in the output. The denominator is the ground truth, never the
eraser's detections. The verifier reads a product's silhouette as a glyph now and then
("D" for a mug with its handle, "口", "门"): a box it also finds in the clean image (IoU
at least 0.5), or one more than twice the instance's size (its box's shorter side), is
not what is left of that instance and is not counted against it. How many instances
that excused, and EA counting every box, are printed beside EA, and the instances not
erased are counted by why: not found (no detector box covers 30 % of it), masked short
(under 99 % of its strokes masked) or left over (the verifier still reads it). Beside
it, what the erase did to the picture:

* **collateral**: of the pixels farther than 12 px from every text stroke, the share
  that the erase changed by more than 12 levels (in any channel, against the source);
  per stratum, over the ring 12-48 px around each instance; and split by what was filled
  there: text areas filled whole (their text not told from its background) over text,
  such areas over no text (a detector box on a handle or grain), or text pixels' masks;
* **edge px moved**: the product outline's pixels farther than 12 px from every stroke
  that changed by more than 12 levels (the erase should not move a product's edge);
* **text-neighbourhood PSNR / SSIM**: against the clean image, within 12 px of an
  instance's strokes (what the fill put where the text was, and around it).

    .venv/bin/python bench/erase_quality.py [--images 96] [--seed 1 | --seed 1-5 | --seed 2,3]
        [--where background=texture] [--cache DIR] [--ocr-runtime R] [--ocr-precision P]

Several seeds are pooled (each a set of ``--images``), with one EA line per seed: a
stratum holds about 60 instances in one set, so one set's per-stratum figure moves by a
few points from seed to seed. ``--where`` erases only the images with that image-wide
stratum (background, jpeg, product), for quick iteration on a subset.
``--ocr-runtime`` and ``--ocr-precision`` choose what runs the detector network, as
``ZIMAGE_OCR_RUNTIME`` and ``ZIMAGE_OCR_PRECISION`` do for the worker, to compare them on
the same images.

``--cache DIR`` keeps the detector's and the verifier's answers in DIR, keyed by the
image's pixels and the call's arguments, for iterating on masks and fills: a rerun with
the same boxes then takes a fifth of the time (`--seed 1` in about 70 s instead of
4 min on two cores). The finding stage is not measured then (its seconds are the cache's),
so times are not comparable with a run without it; and the answers are the detector's of
when they were cached: empty DIR after changing the detector (``erase/ocr.py``; its
runtime and precision are part of the key).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import pickle
import random
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from tqdm import tqdm

from zimage_stream.erase import TextEraser, decode_image
from zimage_stream.erase.masks import FEATHER_PX
from zimage_stream.erase.ocr import BOXES_REVISION, PRECISIONS, RUNTIMES, RapidOcrDetector

LATIN = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")
CJK = Path("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc")
TEXTS = {
    "en": ["SALE 50% OFF", "NEW ARRIVAL", "Free shipping", "$19.99", "LIMITED", "BEST SELLER"],
    "zh": ["限时特惠", "新品上市", "包邮", "正品保证", "买一送一", "热卖"],
    "mixed": ["新品 NEW", "限时 50% OFF", "¥99 包邮", "爆款 HOT"],
}
STRATA = {
    "background": ["plain", "gradient", "texture", "photo"],
    "language": ["en", "zh", "mixed"],
    "size": ["12-20px", "21-48px", "49-96px"],
    "contrast": ["high", "low"],
    "opacity": ["opaque", "translucent"],
    "rotation": ["none", "rotated"],
    "jpeg": ["png", "q90", "q60"],
}
#: where an image's product object is, and so where its first line is placed
PRODUCT = ["none", "on", "edge"]
#: each instance's relation to the product (its ``object`` stratum)
OBJECT = ["none", "on", "edge"]
SIZE_RANGES = {"12-20px": (12, 20), "21-48px": (21, 48), "49-96px": (49, 96)}
#: the fidelity measures' distances and threshold (px, px, levels)
NEAR_PX = 12
RING_PX = 48
CHANGED_LEVELS = 12


@dataclass
class Instance:
    strata: dict[str, str]
    strokes: np.ndarray  # bool mask of the pixels the text changed
    box: tuple[int, int, int, int]  # x0, y0, x1, y1


@dataclass
class Sample:
    data: bytes
    clean: np.ndarray
    strata: dict[str, str]  # the image-wide strata
    instances: list[Instance] = field(default_factory=list)
    outline: np.ndarray | None = None  # bool: the product's outline, when there is one


@dataclass
class Product:
    """A product drawn on the canvas: where it is (bool mask) and its bounding box."""

    inside: np.ndarray
    box: tuple[int, int, int, int]


def background(kind: str, rng: random.Random, w: int, h: int) -> Image.Image:
    base = np.array([rng.randint(60, 230) for _ in range(3)], dtype=np.float32)
    if kind == "plain":
        pixels = np.broadcast_to(base, (h, w, 3)).copy()
    elif kind == "gradient":
        ramp = np.linspace(-40, 40, w, dtype=np.float32)[None, :, None]
        pixels = np.clip(base + ramp, 0, 255) * np.ones((h, 1, 1), np.float32)
    elif kind == "texture":
        noise = np.random.default_rng(rng.randrange(1 << 30)).normal(0, 18, (h // 4, w // 4, 1))
        grain = cv2.resize(noise.astype(np.float32), (w, h))[..., None]
        stripes = 12 * np.sin(np.arange(w, dtype=np.float32) / rng.uniform(6, 20))[None, :, None]
        pixels = np.clip(base + grain + stripes, 0, 255)
    else:  # a soft "product photo": backdrop, a shaded object, a shadow, sensor noise
        pixels = np.clip(
            base + np.linspace(-25, 25, h, dtype=np.float32)[:, None, None], 0, 255
        ) * np.ones((1, w, 1), np.float32)
        image = Image.fromarray(pixels.astype(np.uint8))
        draw = ImageDraw.Draw(image)
        cx, cy, r = w * rng.uniform(0.35, 0.65), h * rng.uniform(0.4, 0.6), h * 0.28
        draw.ellipse((cx - r, cy + r * 0.9, cx + r, cy + r * 1.1), fill=(40, 40, 40))
        colour = tuple(rng.randint(20, 220) for _ in range(3))
        draw.rounded_rectangle((cx - r * 0.7, cy - r, cx + r * 0.7, cy + r), 30, fill=colour)
        image = image.filter(ImageFilter.GaussianBlur(2))
        noise = np.random.default_rng(rng.randrange(1 << 30)).normal(0, 4, (h, w, 3))
        pixels = np.clip(np.asarray(image, np.float32) + noise, 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def add_product(canvas: Image.Image, rng: random.Random) -> Product:
    """A mug-like product with crisp, anti-aliased edges: a body shaded from left to right
    and a handle on one side, in a colour well apart from the background behind it."""
    w, h = canvas.size
    bw, bh = round(w * rng.uniform(0.22, 0.4)), round(h * rng.uniform(0.4, 0.65))
    x0, y0 = rng.randint(w // 8, w - w // 8 - bw), rng.randint(h // 10, h - h // 10 - bh)
    behind = np.asarray(canvas, np.float32)[y0 : y0 + bh, x0 : x0 + bw].mean((0, 1))
    colour = np.array([rng.randint(20, 235) for _ in range(3)], np.float32)
    while np.abs(colour - behind).max() < 70:
        colour = np.array([rng.randint(20, 235) for _ in range(3)], np.float32)
    scale = 4  # drawn 4x larger and shrunk: edges anti-aliased like a photo's
    layer = Image.new("L", (w * scale, h * scale), 0)
    draw = ImageDraw.Draw(layer)
    s = lambda *v: tuple(round(c * scale) for c in v)  # noqa: E731
    draw.rounded_rectangle(s(x0, y0, x0 + bw, y0 + bh), radius=bw * scale // 10, fill=255)
    side = rng.choice([-1, 1])
    hx = x0 + bw if side > 0 else x0
    ring = s(hx - bw * 0.3, y0 + bh * 0.2, hx + bw * 0.3, y0 + bh * 0.7)
    draw.ellipse(ring, outline=255, width=round(bw * 0.08 * scale))
    alpha = np.asarray(layer.resize((w, h), Image.Resampling.BOX), np.float32)[..., None] / 255
    shade = np.linspace(1.15, 0.75, w, dtype=np.float32)[None, :, None]
    if side < 0:
        shade = shade[:, ::-1]
    body = np.clip(colour * shade, 0, 255)
    pixels = np.asarray(canvas, np.float32) * (1 - alpha) + body * alpha
    canvas.paste(Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8)))
    inside = alpha[..., 0] >= 0.5
    ys, xs = np.nonzero(inside)
    return Product(inside, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))


def draw_instance(
    canvas: Image.Image,
    strata: dict[str, str],
    rng: random.Random,
    taken: list[tuple[int, int, int, int]],
    at: tuple[int, int] | None = None,
) -> Instance | None:
    w, h = canvas.size
    size = rng.randint(*SIZE_RANGES[strata["size"]])
    text = rng.choice(TEXTS[strata["language"]])
    font = ImageFont.truetype(str(CJK if strata["language"] != "en" else LATIN), size)
    layer = Image.new("L", (w, h), 0)
    x, y = rng.randint(10, max(11, w - size * len(text) - 10)), rng.randint(10, h - size * 2)
    if at is not None:  # centred at a given point (over or across a product)
        left, top, right, bottom = font.getbbox(text)
        x, y = at[0] - (left + right) // 2, at[1] - (top + bottom) // 2
    ImageDraw.Draw(layer).text((x, y), text, fill=255, font=font)
    if strata["rotation"] == "rotated":
        bbox = layer.getbbox() or (0, 0, 1, 1)
        centre = ((bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2)
        layer = layer.rotate(
            rng.choice([-1, 1]) * rng.uniform(10, 35), Image.BICUBIC, center=centre
        )
    box = layer.getbbox()
    if box is None or any(_overlap(box, other) for other in taken):
        return None
    region = np.asarray(canvas, np.float32)[box[1] : box[3], box[0] : box[2]].mean((0, 1))
    if strata["contrast"] == "high":
        colour = np.array([0, 0, 0] if region.mean() > 127 else [255, 255, 255], np.float32)
    else:
        colour = np.clip(region + (-45 if region.mean() > 127 else 45), 0, 255)
    opacity = 1.0 if strata["opacity"] == "opaque" else rng.uniform(0.45, 0.7)
    alpha = np.asarray(layer, np.float32)[..., None] / 255 * opacity
    pixels = np.asarray(canvas, np.float32) * (1 - alpha) + colour * alpha
    before = np.asarray(canvas)
    canvas.paste(Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8)))
    strokes = (np.asarray(canvas) != before).any(-1)
    taken.append(box)
    return Instance(strata=strata, strokes=strokes, box=box)


def _overlap(a: tuple[int, ...], b: tuple[int, ...], pad: int = 24) -> bool:
    return not (a[2] + pad < b[0] or b[2] + pad < a[0] or a[3] + pad < b[1] or b[3] + pad < a[1])


def _anchor(product: Product, where: str, rng: random.Random) -> tuple[int, int]:
    """Where the product's line is centred: inside its body, or on its left or right edge."""
    x0, y0, x1, y1 = product.box
    y = rng.randint(y0 + (y1 - y0) // 4, y1 - (y1 - y0) // 4)
    if where == "on":
        return rng.randint(x0 + (x1 - x0) // 3, x1 - (x1 - x0) // 3), y
    return rng.choice([x0, x1]) + rng.randint(-8, 8), y


def _relation(product: Product | None, strokes: np.ndarray) -> str:
    """An instance's ``object`` stratum: off the product, inside it, or across its outline."""
    if product is None:
        return "none"
    share = product.inside[strokes].mean()
    return "none" if share == 0 else "on" if share == 1 else "edge"


def make_sample(index: int, seed: int, w: int = 1024, h: int = 768) -> Sample:
    rng = random.Random(seed * 100_003 + index)
    # The product has its own stream, so images without one are the same as before it.
    product_rng = random.Random(seed * 7_919 + index + 1_000_000)
    # Stratify: cycle each attribute independently so every value is well represented.
    pick = {
        name: values[(index + i * 7 + rng.randrange(len(values))) % len(values)]
        for i, (name, values) in enumerate(STRATA.items())
    }
    pick["product"] = PRODUCT[(index + product_rng.randrange(3)) % 3]
    canvas = background(pick["background"], rng, w, h)
    product = add_product(canvas, product_rng) if pick["product"] != "none" else None
    clean = np.asarray(canvas).copy()
    instances: list[Instance] = []
    taken: list[tuple[int, int, int, int]] = []
    for number in range(rng.randint(2, 3)):
        strata = dict(pick)
        for name in ("language", "size", "contrast", "opacity", "rotation"):
            strata[name] = rng.choice(STRATA[name])
        for _attempt in range(20):
            at = None
            if product is not None and number == 0:
                at = _anchor(product, pick["product"], product_rng)
            instance = draw_instance(canvas, strata, rng, taken, at)
            if instance is not None:
                del instance.strata["product"]
                instance.strata["object"] = _relation(product, instance.strokes)
                instances.append(instance)
                break
    buffer = io.BytesIO()
    if pick["jpeg"] == "png":
        canvas.save(buffer, "PNG")
    else:
        canvas.save(buffer, "JPEG", quality=int(pick["jpeg"][1:]))
    outline = None
    if product is not None:
        inside = product.inside.astype(np.uint8)
        outline = cv2.morphologyEx(inside, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    return Sample(buffer.getvalue(), clean, pick, instances, outline)


def verifier_boxes(verifier, rgb: np.ndarray) -> list[tuple[int, int, int, int]]:  # type: ignore[no-untyped-def]
    result, _ = verifier(np.ascontiguousarray(rgb[..., ::-1]))
    boxes = []
    for polygon, _text, _score in result or []:
        points = np.asarray(polygon)
        boxes.append(
            (
                int(points[:, 0].min()),
                int(points[:, 1].min()),
                int(points[:, 0].max()),
                int(points[:, 1].max()),
            )
        )
    return boxes


def leftovers(
    box: tuple[int, int, int, int],
    found: list[tuple[int, int, int, int]],
    clean: list[tuple[int, int, int, int]],
) -> list[tuple[int, int, int, int]]:
    """The verifier's boxes in the output that could be what is left of the instance in
    ``box``: not a box the verifier also finds in the clean image, nor one more than twice
    the instance's size (a product's silhouette read as a glyph)."""
    scale = 2 * min(box[2] - box[0], box[3] - box[1])
    return [
        other
        for other in found
        if min(other[2] - other[0], other[3] - other[1]) <= scale
        and not any(_overlap_px(other, c) >= 0.5 * _union_px(other, c) for c in clean)
    ]


def covered(box: tuple[int, int, int, int], found: list[tuple[int, int, int, int]]) -> bool:
    area = max(1, (box[2] - box[0]) * (box[3] - box[1]))
    return any(_overlap_px(box, other) >= 0.3 * area for other in found)


def _overlap_px(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    """The area two boxes (x0, y0, x1, y1) share."""
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return ix * iy


def _union_px(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    both = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
    return max(1, both - _overlap_px(a, b))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255**2 / mse)


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY).astype(np.float64)
    y = cv2.cvtColor(b, cv2.COLOR_RGB2GRAY).astype(np.float64)
    blur = lambda z: cv2.GaussianBlur(z, (11, 11), 1.5)  # noqa: E731
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    value: np.ndarray = ((2 * mx * my + c1) * (2 * cov + c2)) / (
        (mx**2 + my**2 + c1) * (vx + vy + c2)
    )
    return value


def _distance(strokes: np.ndarray) -> np.ndarray:
    """Every pixel's distance (px) to the nearest stroke pixel."""
    return cv2.distanceTransform((~strokes).astype(np.uint8), cv2.DIST_L2, 5)


@dataclass
class Figures:
    """What the bench collects, per instance (and so per stratum) and per image."""

    erased: list[bool] = field(default_factory=list)
    #: erased had every verifier box counted (the bench before it excused any)
    erased_strict: list[bool] = field(default_factory=list)
    #: why the instances not erased were not: not found, masked short, left-over text
    misses: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    excused: int = 0  # instances erased only because a verifier box was excused
    detected: list[bool] = field(default_factory=list)
    per_stratum: dict[tuple[str, str], list[int]] = field(default_factory=lambda: defaultdict(list))
    per_seed: dict[int, list[bool]] = field(default_factory=lambda: defaultdict(list))
    # per instance: near PSNR, near SSIM, ring pixels, ring pixels changed
    near_psnr: list[float] = field(default_factory=list)
    near_ssim: list[float] = field(default_factory=list)
    ring: list[tuple[int, int]] = field(default_factory=list)
    # per image
    far: list[tuple[int, int]] = field(default_factory=list)  # pixels, changed
    #: far pixels changed, by what was filled there (see ``_causes``)
    far_by_cause: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    edges_moved: list[int] = field(default_factory=list)  # images with a product only
    seconds: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    unsure: int = 0
    psnrs: list[float] = field(default_factory=list)
    ssims: list[float] = field(default_factory=list)
    runtime: str = ""  # what ran the detector network


def measure(  # type: ignore[no-untyped-def]
    figures: Figures, seed: int, sample: Sample, source: np.ndarray, result, found, clean
) -> None:
    """Adds one erased image's figures; ``found`` and ``clean`` are the verifier's boxes in
    the output and in the clean image."""
    output = np.asarray(result.image.convert("RGB"))
    changed = (np.abs(output.astype(np.int16) - source.astype(np.int16)) > CHANGED_LEVELS).any(-1)
    strokes = np.zeros(changed.shape, bool)
    for instance in sample.instances:
        strokes |= instance.strokes
    far = _distance(strokes) > NEAR_PX
    figures.far.append((int(far.sum()), int((changed & far).sum())))
    for cause, zone in _causes(result, strokes).items():
        figures.far_by_cause[cause] += int((changed & far & zone).sum())
    if sample.outline is not None:
        figures.edges_moved.append(int((changed & far & sample.outline).sum()))
    similarity = ssim_map(output, sample.clean)
    boxes = [_bounds(box.polygon) for box in result.regions]
    for instance in sample.instances:
        inside = result.mask.astype(bool)[instance.strokes].mean()
        ok = bool(
            inside >= 0.99 and not covered(instance.box, leftovers(instance.box, found, clean))
        )
        strict = bool(inside >= 0.99 and not covered(instance.box, found))
        figures.erased_strict.append(strict)
        figures.excused += ok and not strict
        own = _distance(instance.strokes)
        near, ring = own <= NEAR_PX, far & (own <= RING_PX)
        detected = covered(instance.box, boxes)
        figures.erased.append(ok)
        figures.per_seed[seed].append(ok)
        figures.detected.append(detected)
        if not ok:
            why = "not found" if not detected else "masked short" if inside < 0.99 else "left over"
            figures.misses[why] += 1
        figures.near_psnr.append(psnr(output[near], sample.clean[near]))
        figures.near_ssim.append(float(similarity[near].mean()))
        figures.ring.append((int(ring.sum()), int((changed & ring).sum())))
        for name, value in instance.strata.items():
            figures.per_stratum[(name, value)].append(len(figures.erased) - 1)
    figures.seconds.append(result.seconds)
    for name, seconds in result.stages.items():
        figures.stages[name].append(seconds)
    figures.unsure += result.unsure
    figures.psnrs.append(psnr(output, sample.clean))
    figures.ssims.append(float(similarity.mean()))


#: how far a fill's feathered edge reaches past what it fills
FEATHER_REACH = FEATHER_PX + 1
#: a box filled whole is over text when this many of the text's stroke pixels are in it
OVER_TEXT_PX = 20


def _causes(result, strokes: np.ndarray) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """Where each kind of fill can have changed pixels (its feathered edge included), each
    pixel given to one kind: boxes filled whole where no text was (a detector box over a
    handle or grain), boxes filled whole over text, and the rest (text pixels' masks)."""
    touched = result.touched
    if result.whole is None:
        return {"text pixels": touched}
    count, labels = cv2.connectedComponents(result.whole.astype(np.uint8))
    over = np.bincount(labels[strokes], minlength=count) >= OVER_TEXT_PX
    over[0] = False
    reach = np.ones((2 * FEATHER_REACH + 1,) * 2, np.uint8)
    on_text = cv2.dilate((over[labels]).astype(np.uint8), reach) > 0
    whole = cv2.dilate(result.whole.astype(np.uint8), reach) > 0
    return {
        "boxes over no text": whole & ~on_text & touched,
        "boxes over text": on_text & touched,
        "text pixels": touched & ~whole,
    }


def _bounds(polygon: np.ndarray) -> tuple[int, int, int, int]:
    xs, ys = polygon[:, 0], polygon[:, 1]
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


class _Cache:
    """Answers kept in a folder, keyed by an image's pixels and the call's arguments."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder

    def get(self, kind: str, rgb: np.ndarray, compute, **arguments):  # type: ignore[no-untyped-def]
        digest = hashlib.sha1(np.ascontiguousarray(rgb).tobytes())
        digest.update(f"{rgb.shape} {sorted(arguments.items())!r}".encode())
        path = self.folder / f"{kind}-{digest.hexdigest()}.pickle"
        if path.is_file():
            return pickle.loads(path.read_bytes())
        answer = compute()
        path.write_bytes(pickle.dumps(answer))
        return answer


class _CachedDetector:
    """The detector, its answers kept in a ``_Cache``."""

    def __init__(self, detector: RapidOcrDetector, cache: _Cache) -> None:
        self.detector, self.cache = detector, cache

    def detect(self, rgb: np.ndarray, **arguments):  # type: ignore[no-untyped-def]
        if "languages" in arguments:
            arguments["languages"] = sorted(arguments["languages"])
        compute = lambda: self.detector.detect(rgb, **arguments)  # noqa: E731
        runtime = self.detector.runtime  # bfloat16 boxes are not float32's
        revision = BOXES_REVISION  # nor are an older detector's
        return self.cache.get(
            "detect", rgb, compute, runtime=runtime, revision=revision, **arguments
        )


def run(
    images: int,
    seeds: list[int],
    where: dict[str, str],
    cache: Path | None = None,
    runtime: str = "auto",
    precision: str = "auto",
) -> Figures:
    from rapidocr_onnxruntime import RapidOCR

    kept = _Cache(cache) if cache is not None else None
    detector = RapidOcrDetector(runtime, precision)
    eraser = TextEraser(detector if kept is None else _CachedDetector(detector, kept))
    verifier = RapidOCR()

    def verify(rgb: np.ndarray) -> list[tuple[int, int, int, int]]:
        if kept is None:
            return verifier_boxes(verifier, rgb)
        return kept.get("verify", rgb, lambda: verifier_boxes(verifier, rgb))  # type: ignore[no-any-return]

    figures = Figures(runtime=detector.runtime)
    for seed, index in tqdm([(seed, index) for seed in seeds for index in range(images)]):
        sample = make_sample(index, seed)
        if any(sample.strata.get(name) != value for name, value in where.items()):
            continue
        source = decode_image(sample.data)
        result = eraser.erase(source, "classical")
        found = verify(np.asarray(result.image.convert("RGB")))
        clean = verify(sample.clean)
        measure(figures, seed, sample, source.pixels, result, found, clean)
    return figures


def report(figures: Figures) -> None:
    f = figures
    far_pixels, far_changed = (sum(column) for column in zip(*f.far, strict=True))
    print(
        f"\n{len(f.seconds)} images, {len(f.erased)} text instances (1024x768, classical engine;"
        f" detector on {f.runtime})"
    )
    print(
        f"erase accuracy (EA): {np.mean(f.erased):.1%}   "
        f"detection recall: {np.mean(f.detected):.1%}"
    )
    print(
        f"  {f.excused} instances erased though the verifier boxed them, its box being in the "
        f"clean image too or at a product's scale; counting every box, EA "
        f"{np.mean(f.erased_strict):.1%}"
    )
    if f.misses:
        reasons = ", ".join(f"{count} {why}" for why, count in sorted(f.misses.items()))
        print(
            f"  not erased: {reasons} (not found: no detector box over it; masked short: "
            f"under 99 % of its strokes masked; left over: the verifier still reads it)"
        )
    print(
        f"collateral (changed > {CHANGED_LEVELS} levels, > {NEAR_PX} px from any stroke): "
        f"{far_changed / max(1, far_pixels):.3%} of those pixels"
    )
    causes = ", ".join(
        f"{cause} {count / max(1, far_pixels):.3%}"
        for cause, count in sorted(f.far_by_cause.items(), key=lambda item: -item[1])
    )
    print(
        f"  by what was filled there: {causes} (boxes: text areas filled whole, their text "
        f"not told from its background; over no text: fewer than {OVER_TEXT_PX} stroke "
        "pixels in them, a detector box on a handle or grain)"
    )
    if f.edges_moved:
        moved = sum(1 for count in f.edges_moved if count)
        print(
            f"product edge px moved: {sum(f.edges_moved)} in {moved} of "
            f"{len(f.edges_moved)} images with a product"
        )
    print(
        f"text-neighbourhood (<= {NEAR_PX} px) vs clean: PSNR median "
        f"{statistics.median(f.near_psnr):.1f} dB, SSIM median {statistics.median(f.near_ssim):.3f}"
    )
    print(
        f"whole image vs clean: PSNR median {statistics.median(f.psnrs):.1f} dB; "
        f"SSIM median {statistics.median(f.ssims):.3f}"
    )
    print(f"seconds per image: median {statistics.median(f.seconds):.2f}, max {max(f.seconds):.2f}")
    if f.stages:
        parts = [f"{name} {sum(values) / len(f.seconds):.2f}" for name, values in f.stages.items()]
        print(f"  mean seconds per image by stage: {', '.join(parts)}")
        print(f"  text areas filled whole (text not told from its background): {f.unsure}")
    print(
        f"\n{'stratum':<12} {'value':<12} {'n':>4} {'EA':>7} {'PSNR':>6} {'SSIM':>6} {'collat.':>8}"
    )
    for (name, value), members in sorted(f.per_stratum.items()):
        ea = np.mean([f.erased[i] for i in members])
        ring_pixels = sum(f.ring[i][0] for i in members)
        ring_changed = sum(f.ring[i][1] for i in members)
        flag = "" if ea >= 0.97 else "  < 97 %"
        print(
            f"{name:<12} {value:<12} {len(members):>4} {ea:>7.1%} "
            f"{statistics.median(f.near_psnr[i] for i in members):>6.1f} "
            f"{statistics.median(f.near_ssim[i] for i in members):>6.3f} "
            f"{ring_changed / max(1, ring_pixels):>8.3%}{flag}"
        )
    if len(f.per_seed) > 1:
        print()
        for seed, oks in f.per_seed.items():
            print(f"seed {seed}: EA {np.mean(oks):.1%} ({sum(oks)}/{len(oks)})")


def _seeds(text: str) -> list[int]:
    if "-" in text:
        first, last = (int(part) for part in text.split("-", 1))
        return list(range(first, last + 1))
    return [int(part) for part in text.split(",")]


def _where(text: str) -> tuple[str, str]:
    name, _, value = text.partition("=")
    if name not in ("background", "jpeg", "product") or not value:
        raise argparse.ArgumentTypeError("use background=..., jpeg=... or product=...")
    return name, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument(
        "--seed", type=_seeds, default=[1], help="one seed, a range (1-5) or a list (2,3)"
    )
    parser.add_argument(
        "--where",
        type=_where,
        action="append",
        default=[],
        help="only images with this image-wide stratum, e.g. background=texture (repeatable)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        help="keep the detector's and verifier's answers here (mask and fill work; see above)",
    )
    parser.add_argument(
        "--ocr-runtime", choices=RUNTIMES, default="auto", help="as ZIMAGE_OCR_RUNTIME"
    )
    parser.add_argument(
        "--ocr-precision", choices=PRECISIONS, default="auto", help="as ZIMAGE_OCR_PRECISION"
    )
    args = parser.parse_args()
    if not CJK.is_file():
        raise SystemExit(f"needs a CJK font at {CJK} (apt-get install fonts-wqy-zenhei)")
    started = time.perf_counter()
    figures = run(
        args.images, args.seed, dict(args.where), args.cache, args.ocr_runtime, args.ocr_precision
    )
    if not figures.erased:
        raise SystemExit("no image matches --where")
    report(figures)
    if args.cache is not None:
        print(f"\n(answers cached in {args.cache}: the finding stage's seconds are not measured)")
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
