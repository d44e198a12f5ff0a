"""Choosing the device, dtype and attention backend the pipeline runs with."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .calls import CAPTION_MULTIPLE

#: attention backends whose kernels accept no attention mask
MASKLESS_BACKENDS = frozenset({"flash", "_flash_3", "_native_flash"})

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(requested: str) -> str:
    """``auto`` picks cuda, then mps, then cpu; an explicit device must exist."""
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("ZIMAGE_DEVICE=cuda but torch sees no CUDA device")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("ZIMAGE_DEVICE=mps but torch sees no MPS device")
    return requested


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(_DTYPES)}") from None


def select_attention_backend(requested: str, device: str) -> tuple[str, str]:
    """The diffusers attention backend to use, and why.

    ``auto`` takes a FlashAttention kernel where diffusers can use one: FlashAttention 3
    on Hopper (diffusers' ``flash_attn_3`` check), then FlashAttention 2 (flash-attn
    2.6.3 or newer, Ampere or newer); PyTorch SDPA (``native``, which picks its own
    kernel) everywhere else. cuDNN attention is not among them: on an H200 it measured
    slower than SDPA (README, "On a GPU"). Flash kernels take no attention mask: a call
    whose captions would need one runs through SDPA (see ``ImageEngine``); the worker
    batches within one caption bucket, so its generate-only batches never do.
    """
    if requested != "auto":
        return requested, "set by ZIMAGE_ATTENTION_BACKEND"
    if device != "cuda":
        return "native", f"auto: PyTorch SDPA on {device}"
    major, minor = torch.cuda.get_device_capability()
    arch = f"sm{major}{minor}"
    if major == 9 and _flash_attn_3():
        return "_flash_3", f"auto: FlashAttention 3 on {arch}"
    if major >= 8 and _flash_attn_2():
        return "flash", f"auto: FlashAttention 2 on {arch}"
    return "native", f"auto: PyTorch SDPA on {arch} (no usable flash-attn package)"


def _flash_attn_3() -> bool:
    from diffusers.utils import is_flash_attn_3_available

    return bool(is_flash_attn_3_available())


def _flash_attn_2() -> bool:
    from diffusers.utils import is_flash_attn_available, is_flash_attn_version

    return bool(is_flash_attn_available() and is_flash_attn_version(">=", "2.6.3"))


def needs_padding_mask(caption_lengths: list[int], multiple: int = CAPTION_MULTIPLE) -> bool:
    """Whether Z-Image's transformer builds an attention mask for these captions.

    It pads every caption to a multiple of 32 tokens and masks only when the padded
    lengths differ within the batch (``_prepare_sequence``); image tokens are equal for
    a batch of one size, so the captions decide.
    """
    padded = {-(-length // multiple) * multiple for length in caption_lengths}
    return len(padded) > 1


def free_device_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
    elif device == "mps":
        torch.mps.empty_cache()


def memory_summary(device: str) -> dict[str, Any]:
    if device != "cuda":
        return {}
    return {
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "device_name": torch.cuda.get_device_name(),
    }


class DeviceClock:
    """Seconds the device spent on model calls: on a GPU, CUDA events recorded on the
    stream at a call's start and end (gaps between calls do not count; host work inside a
    call, such as tokenizing or turning a decoded tensor into a picture, does); the
    wall clock of the call elsewhere."""

    def __init__(self, device: str) -> None:
        self.busy_s = 0.0
        self._cuda = device == "cuda"

    @contextmanager
    def timing(self) -> Iterator[None]:
        if not self._cuda:
            started = time.perf_counter()
            try:
                yield
            finally:
                self.busy_s += time.perf_counter() - started
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            yield
        finally:
            end.record()
            end.synchronize()
            self.busy_s += start.elapsed_time(end) / 1000
