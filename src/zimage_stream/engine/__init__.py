"""The model engine: loading Z-Image-Turbo and running it (``pipeline``), device choices
(``device``) and the miniature random-weight pipeline for tests and the demo (``tiny``)."""

from .pipeline import BatchShape, GenerateJob, ImageEngine, LoadReport

__all__ = ["BatchShape", "GenerateJob", "ImageEngine", "LoadReport"]
