"""The model engine: loading Z-Image-Turbo and running it (``pipeline``), running a batch
under deadlines and the out-of-memory ladder (``runner``), diffusion inpainting
(``inpaint``), device choices (``device``) and the miniature random-weight pipeline for
tests and the demo (``tiny``)."""

from .pipeline import BatchShape, GenerateJob, ImageEngine, LoadReport
from .runner import JobOutcome, RunStats, run_batch

__all__ = [
    "BatchShape",
    "GenerateJob",
    "ImageEngine",
    "JobOutcome",
    "LoadReport",
    "RunStats",
    "run_batch",
]
