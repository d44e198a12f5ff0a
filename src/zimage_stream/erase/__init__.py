"""Text erasure: everything between a source image and the same image without its text.

The room owns reading a source safely (``sources``), finding text (``ocr``), masking it
(``masks``), filling it on the CPU (``classical``) and the pipeline that composes them
(``eraser``). It takes plain arrays and is given what it does not own: the diffusion
inpainter is injected by the engine process, so nothing here imports the engine.
Importing the package loads only ``sources``: the worker reads sources, and the engine
process, which erases, loads the rest when it first names it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..schemas import ModelInfo
from .sources import SourceImage, decode_image, fetch_source, read_source, source_pixels

if TYPE_CHECKING:
    from .eraser import EraseResult, Inpainter, TextEraser
    from .ocr import TextBox, TextDetector, detector_for, make_detector

#: loaded when first named: the worker reads sources, only the engine process erases
_LAZY = {
    "EraseResult": "eraser",
    "Inpainter": "eraser",
    "TextEraser": "eraser",
    "TextBox": "ocr",
    "TextDetector": "ocr",
    "detector_for": "ocr",
    "make_detector": "ocr",
}

__all__ = [
    "EraseResult",
    "Inpainter",
    "SourceImage",
    "TextBox",
    "TextDetector",
    "TextEraser",
    "classical_model",
    "decode_image",
    "detector_for",
    "fetch_source",
    "make_detector",
    "read_source",
    "source_pixels",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: the classical erase's own revision: it is in the cache key, so results of an older
#: way of masking or filling are not served once it changes (2: masks that follow
#: strokes; 3: a second detector view on textured areas; 4: unsure text filled within
#: its box, and outlines kept through a fill; 5: grain specks left out of text masks,
#: faint text on a clean background masked by its strokes, the second look kept to what
#: the first filled; 6: large holes filled at half size inside; 7: unsure lines' boxes
#: narrowed, a hole between three colours filled by Telea alone; 8: a tall box kept when
#: it has a line's shape, read or not, and text pixels filled with a margin of at least
#: 4 px; 9: a box of 48 px or more off grain kept only when it reads clearly as text,
#: and what stands out past a box in a colour unlike its text's left alone; 10: what
#: stands out only beside a box left alone, boxes filled whole grown by a fortieth of
#: the text height; 11: a large line's box filled whole narrowed by 0.18 of its height,
#: not a tenth; 12: and, level, lengthened by a quarter of its height, not a half; 13:
#: so, too, a level line's box from 50 px; 14: a box lengthened at an end where its line
#: is read on past it; 15: a large line's box filled whole narrowed by a fifth of its
#: height; 16: a box read as text filled whole when what stands out in it covers under
#: half of its line; 17: a textured backdrop seen by the detector's texture view alone,
#: large fills not looked at again)
CLASSICAL_REVISION = "17"


def classical_model(ocr_backend: str) -> ModelInfo:
    """What produces ``erase_text`` images with the classical engine: the text detector and
    OpenCV's Telea fill (so its results are cached apart from another detector's), at the
    classical erase's revision."""
    return ModelInfo(
        id=f"classical:{ocr_backend}+opencv-telea",
        revision=CLASSICAL_REVISION,
        device="cpu",
        dtype="uint8",
    )
