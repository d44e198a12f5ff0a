"""Rendering product-like test images with known text, for the erase tests."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

LATIN_FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")
CJK_FONTS = [
    Path("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc"),
    Path("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc"),
]


def cjk_font() -> Path | None:
    return next((p for p in CJK_FONTS if p.is_file()), None)


@dataclass
class Rendered:
    image: Image.Image  # with text
    clean: Image.Image  # the same scene without text
    strokes: np.ndarray  # bool: pixels that the text changed


def product_scene(width: int = 1024, height: int = 768) -> Image.Image:
    """A gradient backdrop with a simple 'product' shape on it."""
    ramp = np.linspace(175, 240, width, dtype=np.float32)[None, :, None]
    backdrop = np.repeat(np.repeat(ramp, height, 0), 3, 2).astype(np.uint8)
    scene = Image.fromarray(backdrop)
    draw = ImageDraw.Draw(scene)
    draw.ellipse((width * 0.38, height * 0.3, width * 0.68, height * 0.8), fill=(90, 120, 160))
    return scene


def mug_scene(width: int = 640, height: int = 360) -> tuple[Image.Image, np.ndarray]:
    """A shaded blue mug with a handle on a warm gradient; and the mug's outline (bool)."""
    ramp = np.linspace(170, 230, width, dtype=np.float32)[None, :, None]
    backdrop = ramp + np.array([20, 0, -40], np.float32)
    pixels = np.broadcast_to(backdrop, (height, width, 3)).copy()
    scale = 4
    layer = Image.new("L", (width * scale, height * scale), 0)
    draw = ImageDraw.Draw(layer)
    draw.rounded_rectangle((880, 240, 1760, 1200), radius=80, fill=255)
    draw.ellipse((1560, 480, 2080, 1000), outline=255, width=70)
    alpha = np.asarray(layer.resize((width, height), Image.Resampling.BOX), np.float32) / 255
    shade = np.linspace(1.1, 0.8, width, dtype=np.float32)[None, :, None]
    body = np.array([50, 70, 150], np.float32) * shade
    pixels = pixels * (1 - alpha[..., None]) + body * alpha[..., None]
    image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
    inside = (alpha >= 0.5).astype(np.uint8)
    outline = cv2.morphologyEx(inside, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    return image, outline


def with_text(
    scene: Image.Image, texts: list[tuple[str, tuple[int, int], Path, int, tuple[int, int, int]]]
) -> Rendered:
    """Draw (text, position, font file, size, colour) items on a copy of ``scene``."""
    image = scene.copy()
    draw = ImageDraw.Draw(image)
    for text, position, font, size, colour in texts:
        draw.text(position, text, fill=colour, font=ImageFont.truetype(str(font), size))
    strokes = (np.asarray(image) != np.asarray(scene)).any(-1)
    return Rendered(image=image, clean=scene, strokes=strokes)


def png_bytes(image: Image.Image, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=str(save.pop("format", "PNG")), **save)
    return buffer.getvalue()
