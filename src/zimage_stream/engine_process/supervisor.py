"""The worker's side of the engine process: start it, feed it calls, and supervise it.

Torch-free: the worker process imports this and never torch. The engine runs in a child
process (``engine_process.child``) started with ``spawn`` (or ``forkserver``: never a plain fork,
so CUDA is safe), so a request that segfaults a native library, or hangs a kernel so
that no deadline check ever runs, takes the child with it and not the worker: the
consumer stays in its group, and the child is started again.

* A reader thread per child receives its messages and hands them to the event loop.
* A watchdog kills the child (SIGTERM, then SIGKILL) when a call makes no progress (no
  denoising step) for its earliest budget plus ``ZIMAGE_ENGINE_GRACE_S``.
* When the child dies, every call inside it fails with ``EngineDied`` (what to do with
  its requests is ``poison.Suspects``' business), and a new child is started; the load
  report then says it is a restart, why and how long it took. Calls made meanwhile wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
import os
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import structlog

from ..engine.calls import (
    BatchShape,
    CaptionRule,
    Done,
    EraseCall,
    Erased,
    Faults,
    GenerateCall,
    GenerateJob,
    JobResult,
    Loaded,
    LoadFailed,
    LoadReport,
    SetFaults,
    Started,
    Step,
)
from ..errors import ModelUnavailableError
from ..schemas import ModelInfo
from ..settings import EngineSettings, OcrSettings
from . import entry

log = structlog.get_logger(__name__)

#: how long a child told to stop, or sent SIGTERM, has before it is killed
STOP_WAIT_S = 2.0
WATCH_INTERVAL_S = 0.2

StepCallback = Callable[[list[int], int, int], None]
"""Called on the event loop with (indices of the call's jobs, step, total)."""


class EngineDied(Exception):
    """The engine process died (``crashed``) or was killed for making no progress
    (``hung``) with this call inside; ``elapsed_s``: since the call started there."""

    def __init__(self, reason: str, elapsed_s: float) -> None:
        super().__init__(f"the engine process {reason} {elapsed_s:.1f} s into the call")
        self.reason, self.elapsed_s = reason, elapsed_s


class _NotStarted(Exception):
    """The engine process died before it began this call."""


@dataclass(eq=False)
class _Call:
    future: asyncio.Future[Any]
    budgets_s: list[float]
    on_step: StepCallback | None = None
    started: float | None = None  # time.monotonic() when the child began it
    progress: float | None = None  # the last sign of life: its start or a step


@dataclass(eq=False)
class _Child:
    process: BaseProcess
    conn: Connection
    loaded: asyncio.Future[Loaded]
    calls: dict[int, _Call] = field(default_factory=dict)
    killed_for: str | None = None


class EngineProcess:
    """The engine in its own supervised process; the worker's only way to the model."""

    def __init__(
        self,
        settings: EngineSettings,
        ocr: OcrSettings | None = None,
        faults: Faults | None = None,
        json_logs: bool | None = None,
    ) -> None:
        self._settings = settings
        self._ocr = ocr or OcrSettings()
        self._faults = faults or Faults()
        self._json_logs = json_logs
        self._child: _Child | None = None
        self._report: LoadReport | None = None
        self._caption: CaptionRule | None = None
        self._call_ids = itertools.count(1)
        self._sender = ThreadPoolExecutor(1, thread_name_prefix="engine-send")
        self._loading: _Child | None = None  # a process started and not yet loaded
        self._watchdog: asyncio.Task[None] | None = None
        self._restarting: asyncio.Task[None] | None = None
        self._stopping = False
        self._stopped = asyncio.Event()
        # Admission: a call that must run alone waits until nothing else is inside.
        self._admit = asyncio.Condition()
        self._inside = 0
        self._alone_waiting = 0
        self._alone_running = False
        self.ready = asyncio.Event()
        #: engine restarts by reason ("crashed", "hung")
        self.restarts: Counter[str] = Counter()
        #: what the timeout and out-of-memory ladder did (calls, timeouts, oom_splits,
        #: isolations), summed over the engine's calls
        self.run_stats: Counter[str] = Counter()

    # -- what the worker reads -------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._report is not None

    @property
    def report(self) -> LoadReport:
        if self._report is None:
            raise RuntimeError("the engine is not loaded; call start() first")
        return self._report

    @property
    def model_info(self) -> ModelInfo:
        return self.report.model_info()

    @property
    def caption_limit(self) -> int | None:
        return None if self._caption is None else self._caption.limit

    @property
    def pid(self) -> int | None:
        """The engine process's id, also while it loads."""
        child = self._child or self._loading
        return None if child is None else child.process.pid

    def check_caption(self, prompt: str) -> int:
        """``prompt``'s caption length in tokens (styled); ``invalid_request`` when it is
        longer than the model takes."""
        return 0 if self._caption is None else self._caption.check(prompt)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> LoadReport:
        """Start the engine process and wait until the model is loaded and warm."""
        loaded = await self._spawn()
        self._report, self._caption = loaded.report, loaded.caption
        self._watchdog = asyncio.create_task(self._watch(), name="engine-watchdog")
        self.ready.set()
        return self._report

    async def stop(self) -> None:
        """Stop the engine process: told first, killed if it does not go. Calls still
        waiting fail with ``model_unavailable``."""
        self._stopping = True
        self._stopped.set()
        self.ready.clear()
        for task in (self._watchdog, self._restarting):
            if task is not None:
                task.cancel()
        loop = asyncio.get_running_loop()
        loading, self._loading = self._loading, None
        if loading is not None:
            await loop.run_in_executor(None, _kill_process, loading.process)
        child, self._child = self._child, None
        if child is not None:
            for call in child.calls.values():
                if not call.future.done():
                    call.future.set_exception(ModelUnavailableError("the worker is stopping"))
            await loop.run_in_executor(None, _stop_process, child)
        self._sender.shutdown(wait=False)

    async def set_faults(self, faults: Faults) -> None:
        """Tests: change the faults the engine process injects (kept across restarts)."""
        self._faults = faults
        child = await self._ready_child()
        await self._send(child, SetFaults(faults))

    # -- calls ---------------------------------------------------------------------------

    async def generate(
        self,
        jobs: list[GenerateJob],
        shape: BatchShape,
        budgets_s: list[float],
        image_format: str,
        on_step: StepCallback | None = None,
        alone: bool = False,
    ) -> list[JobResult]:
        """Each job's encoded images or error, as ``engine.runner.run_batch`` gives them.
        ``alone``: nothing else runs in the engine process meanwhile (a suspect's call)."""

        def message(call_id: int) -> GenerateCall:
            return GenerateCall(call_id, jobs, shape, budgets_s, image_format)

        results: list[JobResult] = await self._call(message, budgets_s, on_step, alone)
        return results

    async def erase(
        self,
        data: bytes,
        engine: str,
        languages: list[str],
        budget_s: float,
        image_format: str,
        alone: bool = False,
    ) -> Erased:
        """The source image without its text, encoded, and the text regions found."""

        def message(call_id: int) -> EraseCall:
            return EraseCall(call_id, data, engine, languages, budget_s, image_format)

        erased: Erased = await self._call(message, [budget_s], None, alone)
        return erased

    async def _call(
        self,
        message: Callable[[int], object],
        budgets_s: list[float],
        on_step: StepCallback | None,
        alone: bool,
    ) -> Any:
        async with self._admission(alone):
            while True:
                child = await self._ready_child()
                call_id = next(self._call_ids)
                call = _Call(asyncio.get_running_loop().create_future(), budgets_s, on_step)
                child.calls[call_id] = call
                try:
                    try:
                        await self._send(child, message(call_id))
                    except OSError as exc:  # the pipe broke: the child is dying, its exit tells
                        log.warning("engine_send_failed", error=repr(exc))
                    return await call.future
                except _NotStarted:
                    continue  # it died before this call began: the next process takes it
                finally:
                    child.calls.pop(call_id, None)

    @contextlib.asynccontextmanager
    async def _admission(self, alone: bool) -> AsyncIterator[None]:
        """Let a call in: one that runs ``alone`` waits until no other call is inside and
        holds the others back until it is done, so that if the process dies, it died of
        that call."""
        async with self._admit:
            if alone:
                self._alone_waiting += 1
                try:
                    await self._admit.wait_for(
                        lambda: self._inside == 0 and not self._alone_running
                    )
                finally:
                    self._alone_waiting -= 1
                self._alone_running = True
            else:
                await self._admit.wait_for(
                    lambda: not self._alone_running and self._alone_waiting == 0
                )
            self._inside += 1
        try:
            yield
        finally:
            async with self._admit:
                self._inside -= 1
                if alone:
                    self._alone_running = False
                self._admit.notify_all()

    async def _ready_child(self) -> _Child:
        """The loaded engine process, once there is one (``model_unavailable`` when the
        worker stops meanwhile)."""
        while True:
            if self._stopping:
                raise ModelUnavailableError("the worker is stopping")
            if self.ready.is_set() and self._child is not None:
                return self._child
            waits = [asyncio.ensure_future(e.wait()) for e in (self.ready, self._stopped)]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
            await asyncio.sleep(0)

    async def _send(self, child: _Child, message: object) -> None:
        # Off the loop: a large erase source takes a while to write into the pipe.
        await asyncio.get_running_loop().run_in_executor(self._sender, child.conn.send, message)

    # -- the child process -----------------------------------------------------------------

    async def _spawn(self) -> Loaded:
        """Start an engine process and wait until it has loaded the model (at most
        ``ZIMAGE_ENGINE_LOAD_TIMEOUT_S``); one that dies, fails or hangs while loading is
        killed and the error raised. Only a loaded process becomes the current one."""
        loop = asyncio.get_running_loop()
        context: Any = multiprocessing.get_context(self._settings.start_method)
        if self._settings.start_method == "forkserver":
            context.set_forkserver_preload([f"{__package__}.child"])
        ours, theirs = context.Pipe()
        process = context.Process(
            target=entry.main,
            args=(theirs, self._settings, self._ocr, self._faults, self._json_logs, os.getpid()),
            name="zimage-engine",
            daemon=True,
        )
        child = _Child(process, ours, loop.create_future())
        self._loading = child
        try:
            await loop.run_in_executor(None, process.start)
            theirs.close()  # so that the child's death reads as the end of the pipe
            threading.Thread(
                target=self._read, args=(child, loop), name="engine-reader", daemon=True
            ).start()
            log.info("engine_process_started", pid=process.pid, method=self._settings.start_method)
            timeout = self._settings.load_timeout_s
            try:
                loaded = await asyncio.wait_for(asyncio.shield(child.loaded), timeout)
            except TimeoutError:
                raise ModelUnavailableError(
                    f"the engine process did not load the model within {timeout:g} s"
                ) from None
        except asyncio.CancelledError:  # killed on a thread of its own: no waiting here
            threading.Thread(target=_kill_process, args=(process,), daemon=True).start()
            raise
        except BaseException:
            await loop.run_in_executor(None, _kill_process, process)
            raise
        finally:
            if self._loading is child:
                self._loading = None
        self._child = child
        return loaded

    def _read(self, child: _Child, loop: asyncio.AbstractEventLoop) -> None:
        """On the reader thread: every message of ``child``, then its end."""
        while True:
            try:
                message = child.conn.recv()
            except (EOFError, OSError):
                break
            if not _call_soon(loop, self._on_message, child, message):
                return
        child.process.join()
        child.conn.close()  # one pipe per process: none is left open after it
        _call_soon(loop, self._on_exit, child)

    def _on_message(self, child: _Child, message: object) -> None:
        now = time.monotonic()
        if isinstance(message, Loaded):
            if not child.loaded.done():
                child.loaded.set_result(message)
            return
        if isinstance(message, LoadFailed):
            if not child.loaded.done():
                child.loaded.set_exception(message.error.error())
            return
        call = child.calls.get(getattr(message, "call_id", -1))
        if call is None or call.future.done():
            return
        if isinstance(message, Started):
            call.started = call.progress = now
        elif isinstance(message, Step):
            call.progress = now
            if call.on_step is not None:
                call.on_step(message.jobs, message.step, message.total)
        elif isinstance(message, Done):
            self.run_stats.update(message.stats)
            if message.error is not None:
                call.future.set_exception(message.error.error())
            else:
                call.future.set_result(message.results)

    def _on_exit(self, child: _Child) -> None:
        code = child.process.exitcode
        if not child.loaded.done():
            # Still loading: ``_spawn`` raises this, and whoever called it decides.
            child.loaded.set_exception(
                ModelUnavailableError(f"the engine process exited with code {code} while loading")
            )
        if self._stopping or child is not self._child:
            return
        reason = child.killed_for or "crashed"
        now = time.monotonic()
        log.error("engine_died", reason=reason, exit_code=code, calls=len(child.calls))
        for call in child.calls.values():
            if call.future.done():
                continue
            if call.started is None:  # never inside: not a suspect, only sent again
                call.future.set_exception(_NotStarted())
            else:
                call.future.set_exception(EngineDied(reason, now - call.started))
        self.ready.clear()
        self._child = None
        if self._restarting is None or self._restarting.done():
            self._restarting = asyncio.create_task(self._restart(reason), name="engine-restart")

    async def _restart(self, reason: str) -> None:
        self.restarts[reason] += 1
        began, pause = time.monotonic(), 1.0
        while not self._stopping:
            try:
                loaded = await self._spawn()
                break
            except Exception as exc:
                log.error("engine_restart_failed", error=repr(exc), again_in_s=pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 30.0)
        else:
            return
        self._caption = loaded.caption
        self._report = replace(
            loaded.report,
            restarts=sum(self.restarts.values()),
            restart_reason=reason,
            restart_s=round(time.monotonic() - began, 3),
        )
        log.warning("engine_restarted", **self._report.as_dict())
        self.ready.set()

    async def _watch(self) -> None:
        """Kill a child whose call makes no progress past its budget plus the grace."""
        grace = self._settings.grace_s
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            child = self._child
            if child is None or child.killed_for is not None:
                continue
            now = time.monotonic()
            for call in child.calls.values():
                if call.started is None or call.progress is None:
                    continue
                quiet_until = max(call.progress, call.started + min(call.budgets_s))
                if now > quiet_until + grace:
                    log.error(
                        "engine_hung",
                        quiet_s=round(now - call.progress, 1),
                        budget_s=min(call.budgets_s),
                        grace_s=grace,
                    )
                    child.killed_for = "hung"
                    loop = asyncio.get_running_loop()
                    loop.run_in_executor(None, _kill_process, child.process)
                    break


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> bool:
    try:
        loop.call_soon_threadsafe(callback, *args)
        return True
    except RuntimeError:  # the loop is closed: the worker has gone
        return False


def _stop_process(child: _Child) -> None:
    """Blocking: ask the child to stop, then make sure it does."""
    with contextlib.suppress(BrokenPipeError, OSError):
        child.conn.send(None)
    child.process.join(STOP_WAIT_S * 5)
    if child.process.is_alive():
        _kill_process(child.process)


def _kill_process(process: BaseProcess) -> None:
    """Blocking: SIGTERM, a short wait, then SIGKILL."""
    if process.pid is None:
        return  # never started
    process.terminate()
    process.join(STOP_WAIT_S)
    if process.is_alive():
        process.kill()
        process.join(STOP_WAIT_S)
