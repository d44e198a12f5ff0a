"""Diffusion inpainting with Z-Image: ``ZImageInpaintPipeline`` built from the loaded pipeline.

``from_pipe`` shares the already loaded modules, so no second copy of the weights is
made. Large product photos are not resized as a whole: each text region is cut out as a
square crop around it, brought to model resolution, inpainted, scaled back and pasted
in, so a 4000 px photo costs what its text costs.

It takes plain arrays and knows nothing of text: the worker hands it to the eraser,
which decides what to fill and blends the result in. Past its deadline a call stops
between two denoising steps with ``DeadlineExceeded``, after freeing device memory.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from .pipeline import DeadlineExceeded, ImageEngine

PROMPT = "clean empty product photo background, seamless surface, no text, no watermark"
MIN_CROP_PX = 256
MODEL_PX = 1024
#: text regions closer than this are filled in one crop
JOIN_PX = 48


class DiffusionInpainter:
    """Fills masked regions with Z-Image-Turbo (blocking: run it on the engine thread)."""

    def __init__(self, engine: ImageEngine, steps: int = 8, model_px: int = MODEL_PX) -> None:
        self._engine = engine
        self._steps = steps
        self._model_px = model_px
        self._pipe: Any = None

    def __call__(
        self,
        rgb: np.ndarray,
        hard: np.ndarray,
        region: np.ndarray,
        deadline: float | None = None,
    ) -> np.ndarray:
        """The full-size image with ``hard`` (uint8, 255 = fill) repainted, one square crop
        around each connected part of ``region`` (bool); not yet blended. ``deadline``
        (``time.monotonic()``): past it, ``DeadlineExceeded`` after the current step."""
        filled = rgb.copy()
        try:
            for x0, y0, x1, y1 in _crops(region, rgb.shape[:2]):
                crop = Image.fromarray(rgb[y0:y1, x0:x1])
                hole = Image.fromarray(hard[y0:y1, x0:x1])
                result = self._inpaint(crop, hole, deadline)
                size = crop.size
                filled[y0:y1, x0:x1] = np.asarray(result.resize(size, Image.Resampling.LANCZOS))
        except DeadlineExceeded:
            self._engine.free_memory()
            raise
        return filled

    def _inpaint(self, crop: Image.Image, hole: Image.Image, deadline: float | None) -> Image.Image:
        side = min(self._model_px, max(MIN_CROP_PX, (max(crop.size) + 15) // 16 * 16))
        pipe = self._inpaint_pipe()
        # Its modules are the engine's: on compiled blocks, a shape no graph covers runs
        # eager rather than compiling on the device thread.
        output = self._engine.compiled.run(
            lambda: pipe(
                prompt=PROMPT,
                image=crop.resize((side, side), Image.Resampling.LANCZOS),
                mask_image=hole.resize((side, side), Image.Resampling.NEAREST),
                strength=1.0,
                height=side,
                width=side,
                num_inference_steps=self._steps,
                guidance_scale=0.0,
                generator=torch.Generator(device="cpu").manual_seed(0),
                callback_on_step_end=self._engine.step_callback(None, self._steps, deadline),
            ),
            f"inpaint {side}x{side}",
        )
        image: Image.Image = output.images[0]
        return image

    def _inpaint_pipe(self) -> Any:
        if self._pipe is None:
            from diffusers import ZImageInpaintPipeline

            self._pipe = ZImageInpaintPipeline.from_pipe(self._engine.pipeline)
            self._pipe.set_progress_bar_config(disable=True)
        return self._pipe


def _crops(region: np.ndarray, shape: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Square crops around each group of text regions, with context on every side. The
    masks hug the strokes, so one line is many small regions: those less than JOIN_PX
    apart are one group, and one crop (one pipeline call), as the line would be."""
    height, width = shape
    joined = cv2.dilate(region.astype(np.uint8), np.ones((JOIN_PX, JOIN_PX), np.uint8))
    count, labels = cv2.connectedComponents(joined, connectivity=8)
    crops = []
    for index in range(1, count):
        x, y, w, h = cv2.boundingRect(((labels == index) & region).astype(np.uint8))
        side = min(max(w, h) * 2, max(height, width))
        side = max(side, min(MIN_CROP_PX, height, width))
        cx, cy = x + w // 2, y + h // 2
        x0 = int(np.clip(cx - side // 2, 0, max(0, width - side)))
        y0 = int(np.clip(cy - side // 2, 0, max(0, height - side)))
        crops.append((x0, y0, min(width, x0 + side), min(height, y0 + side)))
    return crops
