"""Erase accuracy on a seeded, stratified synthetic set of product-like images.

Each image gets 2-3 text instances with known stroke pixels, drawn from strata of
background (plain, gradient, texture, photo), language (zh, en, mixed), size (12-96 px),
contrast (high, low), translucency (opaque, translucent), rotation (none, rotated) and
JPEG quality (lossless, q90, q60). An instance counts as erased only if at least 99 % of
its stroke pixels lie inside the final mask *and* a verifier OCR (RapidOCR's own default
pipeline, which filters by recognition score, unlike the eraser's detector-first call)
finds nothing covering 30 % or more of its box in the output. The denominator is the
ground truth, never the eraser's detections.

    .venv/bin/python bench/erase_quality.py [--images 96] [--seed 1 | --seed 1-5 | --seed 2,3]

Several seeds are pooled (each a set of ``--images``), with one EA line per seed: a
stratum holds about 60 instances in one set, so one set's per-stratum figure moves by a
few points from seed to seed.
"""

from __future__ import annotations

import argparse
import io
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
from zimage_stream.erase.ocr import RapidOcrDetector

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
SIZE_RANGES = {"12-20px": (12, 20), "21-48px": (21, 48), "49-96px": (49, 96)}


@dataclass
class Instance:
    strata: dict[str, str]
    strokes: np.ndarray  # bool mask of the pixels the text changed
    box: tuple[int, int, int, int]  # x0, y0, x1, y1


@dataclass
class Sample:
    data: bytes
    clean: np.ndarray
    instances: list[Instance] = field(default_factory=list)


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


def draw_instance(
    canvas: Image.Image,
    strata: dict[str, str],
    rng: random.Random,
    taken: list[tuple[int, int, int, int]],
) -> Instance | None:
    w, h = canvas.size
    size = rng.randint(*SIZE_RANGES[strata["size"]])
    text = rng.choice(TEXTS[strata["language"]])
    font = ImageFont.truetype(str(CJK if strata["language"] != "en" else LATIN), size)
    layer = Image.new("L", (w, h), 0)
    x, y = rng.randint(10, max(11, w - size * len(text) - 10)), rng.randint(10, h - size * 2)
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


def make_sample(index: int, seed: int, w: int = 1024, h: int = 768) -> Sample:
    rng = random.Random(seed * 100_003 + index)
    # Stratify: cycle each attribute independently so every value is well represented.
    pick = {
        name: values[(index + i * 7 + rng.randrange(len(values))) % len(values)]
        for i, (name, values) in enumerate(STRATA.items())
    }
    canvas = background(pick["background"], rng, w, h)
    clean = np.asarray(canvas).copy()
    instances: list[Instance] = []
    taken: list[tuple[int, int, int, int]] = []
    for _ in range(rng.randint(2, 3)):
        strata = dict(pick)
        for name in ("language", "size", "contrast", "opacity", "rotation"):
            strata[name] = rng.choice(STRATA[name])
        for _attempt in range(20):
            instance = draw_instance(canvas, strata, rng, taken)
            if instance is not None:
                instances.append(instance)
                break
    buffer = io.BytesIO()
    if pick["jpeg"] == "png":
        canvas.save(buffer, "PNG")
    else:
        canvas.save(buffer, "JPEG", quality=int(pick["jpeg"][1:]))
    return Sample(data=buffer.getvalue(), clean=clean, instances=instances)


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


def covered(box: tuple[int, int, int, int], found: list[tuple[int, int, int, int]]) -> bool:
    area = max(1, (box[2] - box[0]) * (box[3] - box[1]))
    for other in found:
        ix = max(0, min(box[2], other[2]) - max(box[0], other[0]))
        iy = max(0, min(box[3], other[3]) - max(box[1], other[1]))
        if ix * iy >= 0.3 * area:
            return True
    return False


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    x = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY).astype(np.float64)
    y = cv2.cvtColor(b, cv2.COLOR_RGB2GRAY).astype(np.float64)
    blur = lambda z: cv2.GaussianBlur(z, (11, 11), 1.5)  # noqa: E731
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    value = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(value.mean())


def run(images: int, seeds: list[int]) -> None:
    from rapidocr_onnxruntime import RapidOCR

    detector = RapidOcrDetector()
    eraser = TextEraser(detector)
    verifier = RapidOCR()
    per_stratum: dict[tuple[str, str], list[bool]] = defaultdict(list)
    detected: list[bool] = []
    erased_all: list[bool] = []
    seconds, psnrs, ssims = [], [], []
    per_seed: dict[int, list[bool]] = defaultdict(list)
    per_seed_stratum: dict[int, dict[tuple[str, str], list[bool]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for seed, index in tqdm([(seed, index) for seed in seeds for index in range(images)]):
        sample = make_sample(index, seed)
        source = decode_image(sample.data)
        result = eraser.erase(source, "classical")
        seconds.append(result.seconds)
        output = np.asarray(result.image.convert("RGB"))
        found = verifier_boxes(verifier, output)
        boxes = [
            tuple(
                int(v)
                for v in (
                    b.polygon[:, 0].min(),
                    b.polygon[:, 1].min(),
                    b.polygon[:, 0].max(),
                    b.polygon[:, 1].max(),
                )
            )
            for b in result.regions
        ]
        for instance in sample.instances:
            inside = result.mask.astype(bool)[instance.strokes].mean()
            ok = bool(inside >= 0.99 and not covered(instance.box, found))
            erased_all.append(ok)
            per_seed[seed].append(ok)
            detected.append(covered(instance.box, boxes))  # type: ignore[arg-type]
            for name, value in instance.strata.items():
                per_stratum[(name, value)].append(ok)
                per_seed_stratum[seed][(name, value)].append(ok)
        psnrs.append(psnr(output, sample.clean))
        ssims.append(ssim(output, sample.clean))
    _print(images * len(seeds), erased_all, detected, per_stratum, seconds, psnrs, ssims)
    if len(seeds) > 1:
        print()
        for seed, oks in per_seed.items():
            (name, value), weakest = min(
                per_seed_stratum[seed].items(), key=lambda item: np.mean(item[1])
            )
            print(
                f"seed {seed}: EA {np.mean(oks):.1%} ({sum(oks)}/{len(oks)}); weakest stratum "
                f"{name} {value} {np.mean(weakest):.1%} (n {len(weakest)})"
            )


def _print(images, erased, detected, per_stratum, seconds, psnrs, ssims) -> None:  # type: ignore[no-untyped-def]
    print(f"\n{images} images, {len(erased)} text instances (1024x768, classical engine)")
    print(f"erase accuracy (EA): {np.mean(erased):.1%}   detection recall: {np.mean(detected):.1%}")
    print(
        f"PSNR vs clean background: median {statistics.median(psnrs):.1f} dB; "
        f"SSIM median {statistics.median(ssims):.3f}"
    )
    print(f"seconds per image: median {statistics.median(seconds):.2f}, max {max(seconds):.2f}")
    print(f"\n{'stratum':<12} {'value':<12} {'n':>4} {'EA':>7}")
    for (name, value), oks in sorted(per_stratum.items()):
        flag = "" if np.mean(oks) >= 0.9 else "  < 90 %"
        print(f"{name:<12} {value:<12} {len(oks):>4} {np.mean(oks):>7.1%}{flag}")


def _seeds(text: str) -> list[int]:
    if "-" in text:
        first, last = (int(part) for part in text.split("-", 1))
        return list(range(first, last + 1))
    return [int(part) for part in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument(
        "--seed", type=_seeds, default=[1], help="one seed, a range (1-5) or a list (2,3)"
    )
    args = parser.parse_args()
    if not CJK.is_file():
        raise SystemExit(f"needs a CJK font at {CJK} (apt-get install fonts-wqy-zenhei)")
    started = time.perf_counter()
    run(args.images, args.seed)
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
