"""torch.compile without surprises: graphs made at warm-up, kept on disk, never a storm.

The transformer's repeated blocks are compiled (``compile_repeated_blocks``), and the
warm-up makes every graph the worker will need: one image, and any batch, each with two
caption lengths and two image shapes, so that the batch, sequence and image dimensions
are traced as dynamic (``WARM_CALLS``). After the warm-up a call that
would still compile again (a shape the graphs do not cover) runs eager instead, and is
counted and logged (``compile_miss``): a new shape never stalls the device for a compile,
and the watchdog never takes a compile for a hang.

With a cache folder (``ZIMAGE_COMPILE_CACHE_DIR``), Inductor's and Triton's caches live
there, so a restarted worker (or another on the same volume) reuses the kernels instead
of compiling them again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import structlog
import torch
from torch._dynamo.exc import RecompileError

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: warm-up calls, as (images, caption, rows added to the warm-up size's height): one image
#: and two, each with a short and a long caption (different caption buckets), square and
#: not (the compiler would otherwise keep "height equals width" as a rule of its graphs),
#: so that batch, sequence, height and width all become dynamic dimensions
WARM_CALLS: tuple[tuple[int, str, int], ...] = (
    (1, "warm-up: a white ceramic mug", 0),
    (2, "warm-up: a white ceramic mug", 0),
    (2, "warm-up: " + "a white ceramic mug on a walnut shelf, soft light, " * 4, 16),
    (1, "warm-up: " + "a white ceramic mug on a walnut shelf, soft light, " * 4, 16),
)


def use_compile_cache(folder: Path | None) -> str | None:
    """Point Inductor's and Triton's caches into ``folder`` (made if missing).

    They read these variables when they first compile, so this runs before any compile;
    the engine process is the only one that compiles, and it owns its environment."""
    if folder is None:
        return None
    folder = folder.expanduser().resolve()
    (folder / "triton").mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")
    torch._inductor.config.fx_graph_cache = True
    return str(folder)


class CompiledCalls:
    """Runs model calls on compiled modules; a call that would compile again runs eager.

    ``torch.compiler.set_stance`` is process-wide: this is right while one thread (the
    engine's device thread) runs all compiled code, as the engine process does."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        #: calls that ran eager because their shape had no graph
        self.misses = 0
        self._warm = False

    def warmed(self) -> None:
        """From now on a new graph is a miss, not a compile."""
        self._warm = True

    def run(self, call: Callable[[], T], shape: str) -> T:
        """``call()`` (it must be safe to run twice: make its random generators inside)."""
        if not (self.enabled and self._warm):
            return call()
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                return call()
        except (RecompileError, RuntimeError) as exc:
            if not _is_recompile(exc):
                raise
            self.misses += 1
            log.warning("compile_miss", shape=shape, misses=self.misses)
        with torch.compiler.set_stance("force_eager"):
            return call()


def _is_recompile(exc: Exception) -> bool:
    # torch 2.13 raises a plain RuntimeError for the stance (pinned in the Makefile; the
    # seam is tested in tests/unit/test_engine.py)
    return isinstance(exc, RecompileError) or str(exc).startswith(
        "Detected recompile when torch.compile stance is 'fail_on_recompile'"
    )


#: image sizes the compiled VAE decoder is warmed for, beside the warm-up's own: the
#: contract's default. Convolutions keep size-range rules in their graphs even when traced
#: dynamic, so other sizes decode eager (and are counted as misses).
VAE_WARM_SIZES: tuple[int, ...] = (1024,)


def compile_vae_decoder(vae: Any) -> None:
    """Compile the VAE's decoder (one image per call, see ``ImageEngine._decode``)."""
    vae.decoder.compile(fullgraph=False)
