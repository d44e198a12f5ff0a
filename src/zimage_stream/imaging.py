"""Encoding generated images for storage."""

from __future__ import annotations

import io

from PIL import Image

CONTENT_TYPES = {"png": "image/png", "webp": "image/webp"}


def encode_image(image: Image.Image, image_format: str) -> bytes:
    """Encode losslessly; the same pixels always give the same bytes (no timestamps)."""
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG", compress_level=4)
    elif image_format == "webp":
        image.save(buffer, format="WEBP", lossless=True, quality=80, method=4)
    else:
        raise ValueError(f"unsupported image format {image_format!r}; use png or webp")
    return buffer.getvalue()
