"""Local services for the tests, the benchmarks and the demo: a private Redis, and a worker
serving in this event loop. (The embedded Kafka-protocol broker lives in ``broker``.)

This module sits on the top floor with the command line and the demo: it may import the
worker; nothing below it imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from .broker import LocalService, free_port
from .settings import Settings

if TYPE_CHECKING:
    from .worker import Worker


class RedisServer(LocalService):
    """A ``redis-server`` process on a loopback port, keeping nothing on disk; use as a
    context manager. ``stop()`` then ``start()`` restarts it on the same port."""

    name = "redis-server"
    start_timeout_s = 10.0

    def __init__(self, binary: str, port: int) -> None:
        self.binary, self.port = binary, port
        self._process: subprocess.Popen[bytes] | None = None

    @classmethod
    def on_free_port(cls) -> RedisServer:
        """A server (not started) for the ``redis-server`` on PATH, on a free port.

        Raises ``FileNotFoundError`` when no ``redis-server`` is installed.
        """
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
        return cls(binary, free_port())

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _launch(self) -> subprocess.Popen[bytes]:
        no_disk = ["--save", "", "--appendonly", "no"]
        return subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", *no_disk],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


@contextlib.asynccontextmanager
async def running_worker(
    settings: Settings,
    worker: Worker | None = None,
    ready_timeout_s: float = 120.0,
    stop_timeout_s: float = 60.0,
) -> AsyncIterator[Worker]:
    """``worker`` (or a new one for ``settings``) serving in this event loop until the
    block ends, when it is stopped within ``stop_timeout_s``.

    Entering waits until the worker is ready: it re-raises the worker's error if it fails
    to start, and raises ``TimeoutError`` if it is not ready within ``ready_timeout_s``.
    """
    from .worker import Worker  # lazily: the rest of the module needs no model stack

    worker = worker or Worker(settings)
    task = asyncio.create_task(worker.run())
    try:
        await _wait_ready(worker, task, ready_timeout_s)
    except BaseException:
        worker.stop()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, timeout=stop_timeout_s)


async def _wait_ready(worker: Worker, task: asyncio.Task[None], timeout_s: float) -> None:
    """Return once ``worker`` is ready; raise if its run ``task`` fails or time runs out."""
    ready = asyncio.create_task(worker.ready.wait())
    done, _ = await asyncio.wait(
        [ready, task], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
    )
    ready.cancel()
    if ready in done:
        return
    if task in done:
        task.result()  # the worker's own error, when it failed to start
        raise RuntimeError("the worker stopped before it was ready")
    if ready not in done:
        raise TimeoutError(f"the worker was not ready within {timeout_s} s")
