"""Rendering product-like test images with known text, for the erase tests."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

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
