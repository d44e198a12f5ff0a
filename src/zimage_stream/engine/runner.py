"""Running one batch on the engine under deadlines and the out-of-memory ladder.

Blocking: it runs on the engine thread. Each job has its own deadline (its request's
``timeout_s`` from the moment the batch started). A pipeline call stops between two
denoising steps once the earliest deadline among its jobs passes; the jobs whose time is
up get ``timeout``, and the others are run again without them. When the device runs out
of memory, the batch is split in halves, and the halves are run one after the other,
down to one job; a single job that still does not fit gets ``out_of_memory``
(retriable). Any other failure of a call with several jobs runs each job alone, so one
request the model cannot take fails by itself (``internal``) and its neighbours are
answered. Device memory is freed after every failed call.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import structlog
import torch
from PIL import Image

from ..errors import InferenceTimeoutError, OutOfMemoryError, ZImageError, as_error
from .pipeline import BatchShape, DeadlineExceeded, GenerateJob, ImageEngine

log = structlog.get_logger(__name__)


@dataclass
class JobOutcome:
    """One job's images, or why it has none."""

    images: list[Image.Image] | None = None
    error: ZImageError | None = None
    #: seconds from the batch's start until this job was done (or given up)
    seconds: float = 0.0


@dataclass
class RunStats:
    calls: int = 0
    timeouts: int = 0
    oom_splits: int = 0
    isolations: int = 0  # batches run again request by request after an error


def run_batch(
    engine: ImageEngine,
    jobs: list[GenerateJob],
    shape: BatchShape,
    budgets_s: list[float],
    stats: RunStats | None = None,
    on_step: Callable[[list[int], int, int], None] | None = None,
) -> list[JobOutcome]:
    """Each job's outcome, in order: its images, or the error that ended it.

    ``on_step(job indices, step, total)`` is called after each denoising step of a call.
    """
    stats = stats or RunStats()
    started = time.monotonic()
    deadlines = [started + budget for budget in budgets_s]
    outcomes = [JobOutcome() for _ in jobs]
    groups: deque[list[int]] = deque([list(range(len(jobs)))])
    while groups:
        group = groups.popleft()
        live = _expire(group, started, deadlines, budgets_s, outcomes, stats)
        if not live:
            continue
        stats.calls += 1
        try:
            images = engine.generate(
                [jobs[i] for i in live],
                shape,
                on_step=None if on_step is None else _for_jobs(on_step, live),
                deadline=min(deadlines[i] for i in live),
            )
        except DeadlineExceeded as exc:
            engine.free_memory()
            log.warning("batch_deadline_passed", jobs=len(live), steps_done=exc.steps_done)
            groups.appendleft(live)  # the expired ones drop out at the top of the loop
            continue
        except torch.OutOfMemoryError as exc:
            engine.free_memory()
            images_wanted = sum(jobs[i].num_images for i in live)
            if len(live) == 1:
                log.error("out_of_memory", images=images_wanted)
                outcomes[live[0]].seconds = time.monotonic() - started
                outcomes[live[0]].error = OutOfMemoryError(
                    f"out of device memory for {images_wanted} images at "
                    f"{shape.width}x{shape.height}, even alone: {str(exc)[:200]}"
                )
                continue
            stats.oom_splits += 1
            half = len(live) // 2
            log.warning("out_of_memory_splitting", jobs=len(live), into=[half, len(live) - half])
            groups.appendleft(live[half:])
            groups.appendleft(live[:half])
            continue
        except Exception as exc:
            # An error not tied to one request (a prompt the model cannot take, a broken
            # kernel): run each request alone, so only the culprit fails.
            engine.free_memory()
            if len(live) > 1:
                stats.isolations += 1
                log.warning("batch_failed_running_alone", jobs=len(live), error=repr(exc))
                groups.extendleft([index] for index in reversed(live))
                continue
            log.exception("inference_failed")
            outcomes[live[0]].seconds = time.monotonic() - started
            outcomes[live[0]].error = as_error(exc, "inference")
            continue
        done = time.monotonic() - started
        for index, job_images in zip(live, images, strict=True):
            outcomes[index].images, outcomes[index].seconds = job_images, done
    return outcomes


def _for_jobs(
    on_step: Callable[[list[int], int, int], None], jobs: list[int]
) -> Callable[[int, int], None]:
    return lambda step, total: on_step(jobs, step, total)


def _expire(
    group: list[int],
    started: float,
    deadlines: list[float],
    budgets_s: list[float],
    outcomes: list[JobOutcome],
    stats: RunStats,
) -> list[int]:
    """The jobs of ``group`` with time left; the others are answered ``timeout``."""
    now, live = time.monotonic(), []
    for index in group:
        if now < deadlines[index]:
            live.append(index)
            continue
        stats.timeouts += 1
        outcomes[index].seconds = now - started
        outcomes[index].error = InferenceTimeoutError(
            f"inference took longer than its {budgets_s[index]:g} s budget; it was stopped"
        )
    return live
