"""The engine on a CUDA device (skipped without one): bf16, warm-up, batch invariance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from zimage_stream.engine import BatchShape, GenerateJob, ImageEngine
from zimage_stream.settings import EngineSettings

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SHAPE = BatchShape(width=512, height=512, num_inference_steps=8, guidance_scale=0.0)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> ImageEngine:
    engine = ImageEngine(EngineSettings(model="tiny", tiny_model_dir=tiny_model_dir))
    engine.load()
    engine.warm_up()
    return engine


def test_auto_device_is_cuda_in_bf16_and_warm_up_is_fast(engine: ImageEngine) -> None:
    report = engine.report
    assert report.device == "cuda" and report.dtype == "bfloat16"
    assert report.warmup_s is not None and report.warmup_s < 5.0
    assert engine._pipe.transformer.dtype == torch.bfloat16


def test_generation_on_cuda_is_reproducible(engine: ImageEngine) -> None:
    first = engine.generate([GenerateJob("a mug", 2, 11)], SHAPE)[0]
    again = engine.generate([GenerateJob("a mug", 2, 11)], SHAPE)[0]
    assert [im.size for im in first] == [(512, 512)] * 2
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_batching_on_cuda_keeps_an_image_close(engine: ImageEngine) -> None:
    alone = np.asarray(engine.generate([GenerateJob("a mug", 1, 5)], SHAPE)[0][0]).astype(int)
    batched = engine.generate([GenerateJob("a cup", 3, 9), GenerateJob("a mug", 1, 5)], SHAPE)[1][0]
    diff = np.abs(np.asarray(batched).astype(int) - alone)
    # Reported, not asserted exact: GPU kernels may pick other reductions per batch size.
    print(f"batched vs alone on cuda: max diff {diff.max()}, differing {np.mean(diff > 0):.4%}")
    assert diff.max() <= 8


def test_flash_backend_falls_back_to_sdpa_for_masked_batches(tiny_model_dir: Path) -> None:
    engine = ImageEngine(
        EngineSettings(
            model="tiny",
            tiny_model_dir=tiny_model_dir,
            attention_backend="_native_flash",
            warmup=False,
        )
    )
    assert engine.load().attention_backend == "_native_flash"
    short = "a mug"
    long = "a very long prompt " * 12  # another 32-token caption bucket: needs a padding mask
    same_bucket = engine.generate([GenerateJob(short, 1, 1), GenerateJob("a cup", 1, 2)], SHAPE)
    mixed = engine.generate([GenerateJob(short, 1, 1), GenerateJob(long, 1, 2)], SHAPE)
    assert len(same_bucket) == len(mixed) == 2
    # After the masked batch the flash backend is back in place.
    processor = engine._pipe.transformer.layers[0].attention.processor
    assert processor._attention_backend == "_native_flash"


def test_auto_attention_names_its_reason(engine: ImageEngine) -> None:
    report = engine.report
    named = {"_flash_3": "FlashAttention 3", "flash": "FlashAttention 2", "native": "SDPA"}
    assert report.attention_reason.startswith("auto: ")
    assert named[report.attention_backend] in report.attention_reason
    processor = engine._pipe.transformer.layers[0].attention.processor
    assert processor._attention_backend in {report.attention_backend, None}
    # the chosen kernel draws (the miniature's captions share one bucket here)
    assert engine.generate([GenerateJob("a mug", 2, 1)], SHAPE)[0]


@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
    reason="float8 needs compute capability 8.9+",
)
def test_fp8_quantizes_the_blocks_and_draws_close_to_bf16(
    engine: ImageEngine, tiny_model_dir: Path
) -> None:
    pytest.importorskip("torchao")
    fp8 = ImageEngine(
        EngineSettings(
            model="tiny", tiny_model_dir=tiny_model_dir, quantization="fp8", warmup=False
        )
    )
    report = fp8.load()
    assert report.quantization == "fp8", report.quantization_reason
    job = [GenerateJob("a mug", 1, 3)]
    ours = np.asarray(fp8.generate(job, SHAPE)[0][0]).astype(float)
    theirs = np.asarray(engine.generate(job, SHAPE)[0][0]).astype(float)
    psnr = 10 * np.log10(255**2 / max(1e-9, float(np.mean((ours - theirs) ** 2))))
    print(f"fp8 against bf16 on the miniature model: PSNR {psnr:.1f} dB")
    assert psnr > 20  # the same picture, roughly; random weights cannot judge quality
