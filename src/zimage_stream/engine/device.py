"""Choosing the device, dtype and attention backend the pipeline runs with."""

from __future__ import annotations

import importlib.util
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


def select_attention_backend(requested: str, device: str) -> str:
    """The diffusers attention backend to use.

    ``auto`` takes the flash-attn package when it is installed and the device is CUDA
    (it is used only for batches without a padding mask, see ``ImageEngine``), and
    PyTorch SDPA (``native``, which picks its flash kernel itself) everywhere else.
    """
    if requested != "auto":
        return requested
    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash"
    return "native"


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
