"""Step progress for ``ZIMAGE_PROGRESS_TOPIC``: throttled events keyed by request id.

The engine thread reports every denoising step of a pipeline call; a reporter passes on
one event per ``INTERVAL_S`` per call (the first and the last step always go) and hands
it to the event loop, where it is published best effort: a lost progress event only
makes a progress bar skip.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from .producer import ResultProducer
from .schemas import ProgressEvent

log = structlog.get_logger(__name__)

INTERVAL_S = 0.25

StepReport = Callable[[list[int], int, int], None]
"""Called on the engine thread with (indices of the batch's jobs in the call, step, total)."""


def step_reporter(
    producer: ResultProducer,
    request_ids: list[str],
    loop: asyncio.AbstractEventLoop,
    spawn: Callable[[Awaitable[None]], None],
) -> StepReport:
    """A reporter for one batch whose jobs belong to ``request_ids``, in order; ``spawn``
    runs the publishing coroutine on ``loop`` (the worker tracks its tasks)."""
    last = [0.0]

    def report(jobs: list[int], step: int, total: int) -> None:  # on the engine thread
        now = time.monotonic()
        if step not in (1, total) and now - last[0] < INTERVAL_S:
            return
        last[0] = now
        events = [ProgressEvent(request_id=request_ids[i], step=step, total=total) for i in jobs]
        loop.call_soon_threadsafe(spawn, _publish(producer, events))

    return report


async def _publish(producer: ResultProducer, events: list[ProgressEvent]) -> None:
    try:
        await asyncio.gather(*(producer.publish_progress(event) for event in events))
    except Exception as exc:  # progress is best effort
        log.warning("progress_not_published", error=repr(exc))
