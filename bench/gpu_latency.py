"""Z-Image-Turbo latency at real size on one GPU, with random weights (no download).

Builds the 6B transformer, the Qwen3-4B text encoder and the Flux VAE from the published
configs in ``bench/configs/z-image-turbo`` straight onto the GPU in bf16, then times
1024² 8-step generation (prompt in, images out) for 1 and 4 images with each available
attention backend, without and with regional ``torch.compile`` of the repeated blocks.
Prints one table: seconds per call and per image (median of ``--repeats``), warm-up and
compile seconds, peak memory. Meant to finish within 8 minutes on one H100.

    python bench/gpu_latency.py                # on a CUDA machine
    python bench/gpu_latency.py --tiny         # the miniature model on the CPU (smoke run)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

CONFIGS = Path(__file__).resolve().parent / "configs" / "z-image-turbo"
PROMPT = "a ceramic coffee mug on a walnut table, soft window light, product photography"


def build_real(device: str, layers: int | None) -> Any:
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3Model

    from zimage_stream.engine.tiny import _train_tokenizer

    def config(name: str) -> dict[str, Any]:
        values = json.loads((CONFIGS / f"{name}.json").read_text())
        if layers is not None:  # a shallower model for a quick check of this script
            for key in ("n_layers", "num_hidden_layers"):
                if key in values:
                    values[key] = layers
        return values

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            transformer = ZImageTransformer2DModel.from_config(config("transformer"))
            vae = AutoencoderKL.from_config(config("vae"))
            text_encoder = Qwen3Model(Qwen3Config(**config("text_encoder")))
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for name in ("x_pad_token", "cap_pad_token"):
            token = getattr(transformer, name)
            token.copy_(torch.ones_like(token))
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_train_tokenizer(),
        transformer=transformer,
    )
    pipe.vae.to(memory_format=torch.channels_last)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny() -> Any:
    from zimage_stream.engine import ImageEngine
    from zimage_stream.settings import EngineSettings

    engine = ImageEngine(EngineSettings(model="tiny", dtype="float32", device="cpu"))
    engine.load()
    return engine.pipeline


def generate(pipe: Any, images: int, size: int, steps: int) -> float:
    sync()
    started = time.perf_counter()
    pipe(
        prompt=[PROMPT] * images,
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=0.0,
        generator=[torch.Generator("cpu").manual_seed(i) for i in range(images)],
    )
    sync()
    return time.perf_counter() - started


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def backends(device: str) -> list[str]:
    if device != "cuda":
        return ["native"]
    found = ["native", "_native_flash", "_native_cudnn"]
    try:
        import flash_attn  # noqa: F401

        found.append("flash")
    except ImportError:
        pass
    return found


def measure(
    pipe: Any, label: str, batches: list[int], size: int, steps: int, repeats: int
) -> list[dict[str, Any]]:
    rows = []
    for images in batches:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        first = generate(pipe, images, size, steps)  # a warm run per shape
        times = [generate(pipe, images, size, steps) for _ in range(repeats)]
        median = statistics.median(times)
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        rows.append(
            {
                "variant": label,
                "images": images,
                "first_s": first,
                "call_s": median,
                "image_s": median / images,
                "peak_gib": peak,
            }
        )
        print(f"  {label:<28} {images} img: {median:.3f} s/call", flush=True)
    return rows


def run(args: argparse.Namespace) -> None:
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    size, steps = (256, 2) if args.tiny else (args.size, args.steps)
    started = time.perf_counter()
    pipe = build_tiny() if args.tiny else build_real(device, args.layers)
    build_s = time.perf_counter() - started
    warmup_s = generate(pipe, 1, size, steps)
    rows: list[dict[str, Any]] = []
    for backend in backends(device):
        try:
            pipe.transformer.set_attention_backend(backend)
            rows += measure(pipe, f"{backend}", args.batches, size, steps, args.repeats)
        except Exception as exc:  # a backend this build lacks: report, go on
            print(f"  {backend}: unavailable ({type(exc).__name__}: {str(exc)[:120]})")
    compile_s = None
    if not args.no_compile and device == "cuda":
        pipe.transformer.set_attention_backend("native")
        pipe.transformer.compile_repeated_blocks(fullgraph=True)
        started = time.perf_counter()
        generate(pipe, 1, size, steps)
        compile_s = time.perf_counter() - started
        rows += measure(
            pipe, "native + compile (regional)", args.batches, size, steps, args.repeats
        )
    _print(name, size, steps, build_s, warmup_s, compile_s, rows)


def _print(
    name: str,
    size: int,
    steps: int,
    build_s: float,
    warmup_s: float,
    compile_s: float | None,
    rows: list[dict[str, Any]],
) -> None:
    print(
        f"\nZ-Image-Turbo architecture, random weights, bf16 on {name}, torch "
        f"{torch.__version__}; {size}x{size}, {steps} steps, guidance 0, prompt included"
    )
    print(
        f"build {build_s:.1f} s; warm-up (first 1-image call) {warmup_s:.2f} s"
        + (f"; regional compile {compile_s:.1f} s" if compile_s is not None else "")
    )
    print("| variant | images | s per call (median) | s per image | first call s | peak GiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['variant']} | {r['images']} | {r['call_s']:.3f} | {r['image_s']:.3f} | "
            f"{r['first_s']:.2f} | {r['peak_gib']:.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="miniature model on the CPU")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="override the layer counts (a quick check, not a measurement)",
    )
    run(parser.parse_args())


if __name__ == "__main__":
    main()
