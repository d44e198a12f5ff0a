"""The engine process: the model and the erase work, apart from the worker.

The worker starts this process (``EngineProcess``, spawn or forkserver, never a plain
fork, so CUDA is safe), sends it calls over a pipe and supervises it. Here the main
thread only receives; a generate call or a diffusion erase runs on the engine thread,
which owns the device, a classical erase on its own thread, and images are encoded on
two more while the device goes on. Whatever a call raises is answered; what kills or
hangs the process is the supervisor's to handle.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict
from multiprocessing.connection import Connection
from typing import Any

import structlog
import torch

from ..engine.calls import (
    Done,
    EncodedImage,
    EraseCall,
    Erased,
    Faults,
    GenerateCall,
    JobResult,
    Loaded,
    LoadFailed,
    SetFaults,
    Started,
    Step,
    WireError,
)
from ..engine.pipeline import ImageEngine
from ..engine.runner import JobOutcome, RunStats, run_batch
from ..erase import decode_image
from ..errors import ZImageError, as_error
from ..imaging import encode_image
from ..logs import configure_logging, progress_bars_wanted
from ..settings import EngineSettings, OcrSettings

log = structlog.get_logger(__name__)


def main(
    conn: Connection,
    settings: EngineSettings,
    ocr: OcrSettings,
    faults: Faults,
    json_logs: bool | None,
    worker_pid: int,
) -> None:
    """The engine process's entry point: load, warm up, then answer calls until told to
    stop or until the worker is gone."""
    configure_logging(json_logs)
    _route_library_logging()
    structlog.contextvars.bind_contextvars(process="engine")
    # Ctrl-C reaches the whole process group: the worker shuts down in order and stops
    # this process itself once the batch on the device is done.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    EngineChild(conn, settings, ocr, faults, worker_pid).run()


def _route_library_logging() -> None:
    """diffusers and transformers print through handlers of their own: let their records
    reach the structured handler instead, and show their progress bars (and the hub's
    downloads) only on a terminal."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.disable_default_handler()
        library.enable_propagation()
        if not progress_bars_wanted():
            library.disable_progress_bar()
    if not progress_bars_wanted():
        disable_progress_bars()


class EngineChild:
    def __init__(
        self,
        conn: Connection,
        settings: EngineSettings,
        ocr: OcrSettings,
        faults: Faults,
        worker_pid: int,
    ) -> None:
        self._conn = conn
        self._worker_pid = worker_pid
        self._sending = threading.Lock()
        self._settings = settings
        self._engine = ImageEngine(settings)
        self._engine.fault_hook = self._fault
        self._ocr = ocr
        self._faults = faults
        self._eraser: Any = None
        self._device = ThreadPoolExecutor(1, thread_name_prefix="engine-device")
        self._erase_pool = ThreadPoolExecutor(1, thread_name_prefix="engine-erase")
        self._encoders = ThreadPoolExecutor(2, thread_name_prefix="engine-encode")

    def run(self) -> None:
        if self._faults.at_load == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        if self._faults.at_load == "hang":
            threading.Event().wait()
        try:
            self._engine.load()
            if self._settings.warmup:
                self._engine.warm_up()
        except Exception as exc:
            if isinstance(exc, ZImageError):  # a cause the message names (a model not found)
                log.error("engine_load_failed", code=exc.code, error=exc.message)
            else:
                log.exception("engine_load_failed")
            self._send(LoadFailed(WireError.of(as_error(exc, "loading the model"))))
            return
        self._send(Loaded(self._engine.report, self._engine.caption_rule()))
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                log.warning("engine_orphaned", note="the worker is gone; exiting")
                os._exit(0)  # the engine thread may be inside a call: do not wait for it
            if message is None:
                break  # the worker stops: it waited for its calls first
            self._dispatch(message)
        for pool in (self._device, self._erase_pool, self._encoders):
            pool.shutdown(wait=True)

    def _dispatch(self, message: object) -> None:
        if isinstance(message, GenerateCall):
            self._device.submit(self._generate, message)
        elif isinstance(message, EraseCall):
            pool = self._device if message.engine == "diffusion" else self._erase_pool
            pool.submit(self._erase, message)
        elif isinstance(message, SetFaults):
            self._faults = message.faults
        else:
            log.error("engine_message_unknown", message=repr(message)[:200])

    # -- calls ---------------------------------------------------------------------------

    def _generate(self, call: GenerateCall) -> None:
        self._send(Started(call.call_id))
        stats = RunStats()
        cache, compiled = self._engine.prompt_cache, self._engine.compiled
        hits, misses, compile_misses = cache.hits, cache.misses, compiled.misses
        busy_s = self._engine.clock.busy_s
        try:
            self._inject([job.prompt for job in call.jobs])

            def on_step(jobs: list[int], step: int, total: int) -> None:
                self._send(Step(call.call_id, jobs, step, total))

            outcomes = run_batch(
                self._engine, call.jobs, call.shape, call.budgets_s, stats, on_step
            )
        except Exception as exc:  # run_batch answers each job; this failed around it
            log.exception("engine_call_failed")
            self._send(Done(call.call_id, error=WireError.of(as_error(exc, "inference"))))
            return
        counts = asdict(stats)
        counts.update(
            prompt_cache_hits=cache.hits - hits,
            prompt_cache_misses=cache.misses - misses,
            compile_misses=compiled.misses - compile_misses,
            device_busy_ms=round((self._engine.clock.busy_s - busy_s) * 1000),
        )
        # Encoding leaves the device thread: the next call starts while this one's images
        # are compressed.
        self._encoders.submit(self._finish_generate, call, outcomes, counts)

    def _finish_generate(
        self, call: GenerateCall, outcomes: list[JobOutcome], stats: dict[str, int]
    ) -> None:
        try:
            results = [
                JobResult(
                    images=None
                    if outcome.images is None
                    else [self._encoded(image, call.image_format) for image in outcome.images],
                    error=outcome.error,
                    seconds=outcome.seconds,
                )
                for outcome in outcomes
            ]
            done = Done(call.call_id, results=results, stats=stats)
        except Exception as exc:
            log.exception("encoding_failed")
            done = Done(call.call_id, error=WireError.of(as_error(exc, "encoding the images")))
        self._send(done)

    def _erase(self, call: EraseCall) -> None:
        self._send(Started(call.call_id))
        clock = self._engine.clock
        busy_s = clock.busy_s
        try:
            deadline = time.monotonic() + call.budget_s  # from when decoding starts
            # A diffusion erasure runs on the device thread: the device's time.
            on_device = clock.timing() if call.engine == "diffusion" else nullcontext()
            with on_device:
                erased = self._text_eraser().erase(
                    decode_image(call.data), call.engine, call.languages, deadline
                )
            image = self._encoded(erased.image, call.image_format)
            regions = [box.as_region() for box in erased.regions]
            stats = {"device_busy_ms": round((clock.busy_s - busy_s) * 1000)}
            self._send(Done(call.call_id, results=Erased(image, regions), stats=stats))
        except Exception as exc:
            if not isinstance(exc, ZImageError):
                log.exception("erase_failed")
            self._send(Done(call.call_id, error=WireError.of(as_error(exc, "text erasure"))))

    def _text_eraser(self) -> Any:
        if self._eraser is None:
            from ..engine.inpaint import DiffusionInpainter
            from ..erase import TextEraser, detector_for

            self._eraser = TextEraser(
                detector_for(self._ocr),
                diffusion=DiffusionInpainter(self._engine),
                prefer_diffusion=self._engine.report.device != "cpu",
            )
        return self._eraser

    @staticmethod
    def _encoded(image: Any, image_format: str) -> EncodedImage:
        return EncodedImage(encode_image(image, image_format), image.width, image.height)

    def _send(self, message: object) -> None:
        with self._sending:
            try:
                self._conn.send(message)
            except (BrokenPipeError, OSError):
                os._exit(0)  # the worker is gone

    # -- faults for tests ------------------------------------------------------------------

    def _inject(self, prompts: list[str]) -> None:
        faults = self._faults

        def marked(marker: str | None) -> bool:
            return marker is not None and any(marker in prompt for prompt in prompts)

        if marked(faults.crash_on):
            log.warning("fault_injected", fault="segfault")
            os.kill(os.getpid(), signal.SIGSEGV)
        if marked(faults.hang_on):
            log.warning("fault_injected", fault="hang")
            threading.Event().wait()  # never returns, and no deadline check runs
        if marked(faults.kill_worker_on):
            log.warning("fault_injected", fault="kill the worker")
            os.kill(self._worker_pid, signal.SIGKILL)
            threading.Event().wait()

    def _fault(self, where: str, value: int) -> None:
        faults = self._faults
        if where == "step" and faults.step_sleep_s:
            time.sleep(faults.step_sleep_s)
        over = faults.oom_over_images
        if where == "call" and over is not None and value > over:
            raise torch.OutOfMemoryError("CUDA out of memory (injected). Tried to allocate")
