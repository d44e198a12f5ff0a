"""The model engine: loading Z-Image-Turbo and running it (``pipeline``), running a batch
under deadlines and the out-of-memory ladder (``runner``), diffusion inpainting
(``inpaint``), device choices (``device``) and the miniature random-weight pipeline for
tests and the demo (``tiny``). It runs in the engine process (``engine_process``).

``calls`` holds the torch-free values that cross between the worker and that process.
Importing this package imports no torch; ``ImageEngine``, ``JobOutcome``, ``RunStats``
and ``run_batch`` load it when first named (the worker never names them).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .calls import BatchShape, GenerateJob, JobResult, LoadReport

if TYPE_CHECKING:
    from .pipeline import ImageEngine
    from .runner import JobOutcome, RunStats, run_batch

_WITH_TORCH = {
    "ImageEngine": "pipeline",
    "JobOutcome": "runner",
    "RunStats": "runner",
    "run_batch": "runner",
}

__all__ = [
    "BatchShape",
    "GenerateJob",
    "ImageEngine",
    "JobOutcome",
    "JobResult",
    "LoadReport",
    "RunStats",
    "run_batch",
]


def __getattr__(name: str) -> Any:
    if name in _WITH_TORCH:
        return getattr(importlib.import_module(f".{_WITH_TORCH[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
