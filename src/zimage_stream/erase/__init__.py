"""Text erasure: everything between a source image and the same image without its text.

The room owns reading a source safely (``sources``), finding text (``ocr``), masking it
(``masks``), filling it on the CPU (``classical``) and the pipeline that composes them
(``eraser``). It takes plain arrays and is given what it does not own: the diffusion
inpainter is injected by the worker, so nothing here imports the engine.
"""

from .classical import classical_model
from .eraser import EraseResult, Inpainter, TextEraser
from .ocr import TextBox, TextDetector, detector_for, make_detector
from .sources import SourceImage, decode_image, fetch_source, read_source, source_pixels

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
