"""FP8 for the transformer's linear layers (``ZIMAGE_QUANTIZATION=fp8``).

torchao's float8 dynamic quantization of activations and weights, one scale per row, on
the attention and feed-forward projections of the transformer's blocks. The embedders,
the adaLN modulations and the final layer stay in bf16: they are small, and they set the
scale of everything after them. Float8 matmuls need CUDA compute capability 8.9 or newer
(Ada, Hopper, Blackwell) and the ``torchao`` package (``pip install zimage-stream[fp8]``);
where either is missing the model runs unquantized and the load report says why.
"""

from __future__ import annotations

import importlib.util
import re
from typing import Any

import structlog
import torch

log = structlog.get_logger(__name__)

#: the linear layers that take FP8: attention and feed-forward inside the blocks
_TARGET = re.compile(
    r"^(layers|noise_refiner|context_refiner)\.\d+\.(attention\.(to_q|to_k|to_v|to_out\.0)"
    r"|feed_forward\.w[123])$"
)


def fp8_targets(transformer: torch.nn.Module) -> list[str]:
    """Names of the linear layers FP8 applies to (their sides must be multiples of 16,
    which the float8 matmul requires)."""
    return [
        name
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear)
        and _TARGET.match(name)
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    ]


def fp8_unavailable(device: str, dtype: torch.dtype) -> str | None:
    """Why FP8 cannot run here, or None when it can."""
    if dtype != torch.bfloat16:  # torchao's per-row scales are for bf16 weights
        return f"fp8 needs ZIMAGE_DTYPE=bfloat16 (the model runs in {dtype})"
    if device != "cuda":
        return f"fp8 needs a CUDA device (running on {device})"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        return f"fp8 needs CUDA compute capability 8.9 or newer (this GPU: {major}.{minor})"
    if importlib.util.find_spec("torchao") is None:
        return "fp8 needs torchao: pip install 'zimage-stream[fp8]'"
    return None


def quantize_transformer(transformer: Any, requested: str, device: str) -> tuple[str, str]:
    """Apply ``requested`` ("none" or "fp8") where it can run; returns what was applied
    and why."""
    if requested == "none":
        return "none", "set by ZIMAGE_QUANTIZATION"
    reason = fp8_unavailable(device, next(transformer.parameters()).dtype)
    if reason is not None:
        log.warning("quantization_unavailable", requested=requested, reason=reason)
        return "none", reason
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        PerRow,
        quantize_,
    )

    targets = set(fp8_targets(transformer))
    quantize_(
        transformer,
        Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
        filter_fn=lambda _module, name: name in targets,
    )
    log.info("transformer_quantized", mode="fp8", layers=len(targets))
    return "fp8", f"torchao float8 per-row on {len(targets)} linear layers"
