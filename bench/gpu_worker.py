"""Every GPU measurement of the engine's speed settings and of the worker, in one run.

Real-size Z-Image-Turbo with random weights (``gpu_latency.build_real``, saved once as a
diffusers folder so the worker loads it through its own code). Sections, in order:

  steps   s per image for each speed step, cumulative: eager SDPA without the prompt
          cache, + prompt cache, + attention ``auto``, + regional compile, + FP8,
          + compiled VAE decode; batch 1 and 4, median of ``--repeats``, peak memory.
  fp8     FP8's deviation from bf16 on the same seeds: relative error of the final
          latents, PSNR of the decoded images.
  worker  the worker against the naive service (one request at a time: generate, encode,
          store, publish) through the broker on the same GPU: 4 images per request at
          1024², with no repeats and with 20 % exact repeats, and a mixed 512²/768²/1024²
          workload; images/s ratio, device busy from CUDA events while saturated
          (the engine's ``device_busy_ms``), p50/p99 publish-to-result.
  warmup  a restarted worker's warm-up with a warm compile cache, and with an empty one.

    python bench/gpu_worker.py --device cpu --model tiny --quick       # plumbing, CPU

On a CUDA machine the whole run takes about a quarter of an hour at the defaults (an
estimate from bench/gpu_latency.py's H200 figures), more than one 10-minute device call:
run it in two, on one machine while it stays warm, the saved weights reused:

    python bench/gpu_worker.py --sections steps,fp8 --folder /tmp/zr | tee bench/gpu-steps.txt
    python bench/gpu_worker.py --sections worker,warmup --folder /tmp/zr | tee bench/gpu-worker.txt

With ``--model tiny`` the miniature model stands in (CPU smoke run, figures meaningless).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Run as a script, so this folder is on sys.path and its modules import directly.
from _services import bench_settings, broker
from throughput import measure, naive_service, workload_of
from zimage_stream.engine import BatchShape, GenerateJob, ImageEngine
from zimage_stream.engine.compilation import WARM_CALLS, compile_vae_decoder
from zimage_stream.engine.device import select_attention_backend
from zimage_stream.engine.quantization import quantize_transformer
from zimage_stream.engine_process import EngineProcess
from zimage_stream.settings import EngineSettings, Settings
from zimage_stream.testing import running_worker
from zimage_stream.topics import ensure_topics

PROMPT = "a ceramic coffee mug on a walnut table, soft window light, product photography"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--model", default="real", help="'real' (random weights) or 'tiny'")
    parser.add_argument("--sections", default="steps,fp8,worker,warmup")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=12, help="per worker workload")
    parser.add_argument("--no-compile", action="store_true", help="skip compiled variants")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a plumbing check")
    parser.add_argument("--folder", type=Path, default=None, help="where the model is saved")
    args = parser.parse_args()
    if args.quick:
        args.size, args.steps, args.repeats, args.requests = 256, 2, 1, 4
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    model = model_folder(args, dtype)
    print(f"torch {torch.__version__}, {device_name(args.device)}, model {args.model} ({model})")
    sections = set(args.sections.split(","))
    if sections & {"steps", "fp8"}:
        steps_and_fp8(args, model, dtype, sections)
        gc.collect()  # that engine's memory to the sections after
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if "worker" in sections:
        asyncio.run(worker_against_naive(args, model, dtype))
    if "warmup" in sections and not args.no_compile:
        asyncio.run(restart_warmup(args, model, dtype))


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "CPU"


def model_folder(args: argparse.Namespace, dtype: str) -> str:
    """The model the engines load: ``tiny``, or real-size random weights saved once."""
    if args.model == "tiny":
        return "tiny"
    folder = args.folder or Path(tempfile.gettempdir()) / "zimage-random-real"
    if not (folder / "model_index.json").is_file():
        from gpu_latency import build_real

        started = time.perf_counter()
        build_real(args.device, None).save_pretrained(folder)
        print(
            f"saved real-size random weights to {folder} in {time.perf_counter() - started:.0f} s"
        )
    return str(folder)


def engine_settings(model: str, device: str, dtype: str, **values: Any) -> EngineSettings:
    """Engine settings from the environment (ZIMAGE_*), with these values over them."""
    settings = Settings(_env_file=None, model=model, device=device, dtype=dtype, **values)  # type: ignore[call-arg]
    return settings.engine


# -- steps and fp8 --------------------------------------------------------------------------


def steps_and_fp8(args: argparse.Namespace, model: str, dtype: str, sections: set[str]) -> None:
    engine = ImageEngine(
        engine_settings(model, args.device, dtype, attention_backend="native", prompt_cache_size=0)
    )
    engine.load()
    shape = BatchShape(args.size, args.size, args.steps, 0.0)
    rows: list[dict[str, Any]] = []

    def step(label: str) -> None:
        if "steps" in sections:
            rows.extend(time_batches(engine, label, shape, args.repeats))

    step("eager, SDPA, no prompt cache")
    engine.prompt_cache.size = 256
    step("+ prompt cache")
    backend, why = select_attention_backend("auto", engine.report.device)
    set_backend(engine, backend)
    step(f"+ attention auto: {backend} ({why})")
    if not args.no_compile:
        engine.pipeline.transformer.compile_repeated_blocks(fullgraph=True)
        warm(engine, args.size)
        step("+ regional compile")
    fp8_step(engine, shape, "fp8" in sections, step)
    if not args.no_compile:
        compile_vae_decoder(engine.pipeline.vae)
        warm(engine, args.size)
        step("+ compiled VAE decode")
        if args.device == "cuda":
            cuda_graphs(engine, args.size, step)
    if rows:
        print_steps(rows, args, engine)


def fp8_step(engine: ImageEngine, shape: BatchShape, deviation: bool, step: Any) -> None:
    """FP8 on top of what runs so far; its deviation against the same setup without it."""
    reference = latents_of(engine, shape) if deviation else None
    applied, why = quantize_transformer(engine.pipeline.transformer, "fp8", engine.report.device)
    if applied != "fp8":
        print(f"fp8 not measured: {why}")
        return
    torch._dynamo.reset()  # the blocks' graphs were made for bf16 weights
    warm(engine, shape.width)
    step("+ fp8")
    if reference is not None:
        fp8_deviation(engine, shape, reference)


def cuda_graphs(engine: ImageEngine, size: int, step: Any) -> None:
    """Not cumulative: CUDA graphs (``reduce-overhead``) instead of the default mode.
    Regional compile chains one block's graph output into the next, which CUDA graphs
    may refuse (pytorch#152887): then the reason is printed and the run goes on."""
    try:
        torch._dynamo.reset()
        engine.pipeline.transformer.compile_repeated_blocks(fullgraph=True, mode="reduce-overhead")
        warm(engine, size)
        step("(instead) CUDA graphs: compile mode reduce-overhead")
    except Exception as exc:
        print(f"CUDA graphs not measured: {type(exc).__name__}: {str(exc)[:200]}")


def set_backend(engine: ImageEngine, backend: str) -> None:
    engine.pipeline.transformer.set_attention_backend(backend)
    engine._report = replace(engine.report, attention_backend=backend)


def warm(engine: ImageEngine, size: int) -> None:
    engine.run_warm_calls(WARM_CALLS, size, steps=1)


def time_batches(
    engine: ImageEngine, label: str, shape: BatchShape, repeats: int
) -> list[dict[str, Any]]:
    rows = []
    for images in (1, 4):
        jobs = [GenerateJob(PROMPT, images, 7)]
        reset_peak()
        engine.generate(jobs, shape)  # a warm call of this shape
        times = []
        for _ in range(repeats):
            sync()
            started = time.perf_counter()
            engine.generate(jobs, shape)
            sync()
            times.append(time.perf_counter() - started)
        call_s = statistics.median(times)
        rows.append(
            {"variant": label, "images": images, "image_s": call_s / images, "peak": peak_gib()}
        )
        print(f"  {label[:60]:<60} {images} img: {call_s / images:.3f} s/image", flush=True)
    return rows


def print_steps(rows: list[dict[str, Any]], args: argparse.Namespace, engine: ImageEngine) -> None:
    print(
        f"\nspeed steps, cumulative: {args.size}x{args.size}, {args.steps} steps, guidance 0, "
        f"{engine.report.dtype}, prompt encoded in every call (cached from the second)"
    )
    print("| step | s/image, batch 1 | s/image, batch 4 | peak GiB (batch 4) |")
    print("| --- | --- | --- | --- |")
    by_variant: dict[str, dict[int, dict[str, Any]]] = {}
    for row in rows:
        by_variant.setdefault(row["variant"], {})[row["images"]] = row
    for variant, pair in by_variant.items():
        print(
            f"| {variant} | {pair[1]['image_s']:.3f} | {pair[4]['image_s']:.3f} | "
            f"{pair[4]['peak']:.1f} |"
        )


SEEDS = (1, 2, 3, 4)


@torch.no_grad()
def latents_of(engine: ImageEngine, shape: BatchShape) -> list[tuple[torch.Tensor, np.ndarray]]:
    """Final latents and decoded pixels for ``SEEDS``, one image per call."""
    pipe, found = engine.pipeline, []
    for seed in SEEDS:
        latent = pipe(
            prompt=[PROMPT],
            height=shape.height,
            width=shape.width,
            num_inference_steps=shape.num_inference_steps,
            guidance_scale=0.0,
            generator=[torch.Generator("cpu").manual_seed(seed)],
            output_type="latent",
        ).images[0]
        image = engine._decode(latent)
        found.append((latent.float().cpu(), np.asarray(image, dtype=np.float64)))
    return found


def fp8_deviation(
    engine: ImageEngine, shape: BatchShape, reference: list[tuple[torch.Tensor, np.ndarray]]
) -> None:
    errors, psnrs = [], []
    for (ref_latent, ref_pixels), (latent, pixels) in zip(
        reference, latents_of(engine, shape), strict=True
    ):
        errors.append(float((latent - ref_latent).norm() / ref_latent.norm()))
        mse = float(np.mean((pixels - ref_pixels) ** 2))
        psnrs.append(math.inf if mse == 0 else 10 * math.log10(255**2 / mse))
    print(
        f"fp8 against bf16, seeds {list(SEEDS)}: latent relative error median "
        f"{statistics.median(errors):.4f} (max {max(errors):.4f}); decoded PSNR median "
        f"{statistics.median(psnrs):.1f} dB (min {min(psnrs):.1f})"
    )


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


# -- the worker against the naive service ------------------------------------------------------


def worker_settings(args: argparse.Namespace, bootstrap: str, model: str, dtype: str) -> Settings:
    compile_mode = "off" if args.no_compile else "regional"
    return bench_settings(
        bootstrap,
        redis_url="",
        model=model,
        device=args.device,
        dtype=dtype,
        compile=compile_mode,
        warmup_size=min(args.size, 512),
        batch_window_ms=30,
        max_batch_size=8,
    )


async def worker_against_naive(args: argparse.Namespace, model: str, dtype: str) -> None:
    size, n, steps = args.size, args.requests, args.steps
    big = [(size, size)]
    # the contract's smallest side is 256
    mixed = [(max(256, s // 16 * 16),) * 2 for s in (size // 2, size * 3 // 4)] + big
    workloads = [
        (f"4 images at {size}², no repeats", workload_of(n, 0.0, steps, big, [4], "a")),
        (f"4 images at {size}², 20 % repeats", workload_of(n, 0.2, steps, big, [4], "b")),
        ("mixed sizes (½, ¾, 1), 20 % repeats", workload_of(n, 0.2, steps, mixed, [4], "c")),
    ]
    with broker() as bootstrap:
        settings = worker_settings(args, bootstrap, model, dtype)
        await ensure_topics(settings.kafka, 3)
        naive_rows = await run_naive(args, bootstrap, model, dtype, workloads)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the naive engine is gone: its memory to the worker
        print(f"\nworker against the naive service, {n} requests a workload, {steps} steps")
        print(
            "| workload | naive images/s | worker images/s | ratio | worker device busy |", end=""
        )
        print(" worker p50 / p99 s |\n| --- | --- | --- | --- | --- | --- |")
        async with running_worker(settings, ready_timeout_s=1200) as worker:
            if worker.engine.report.placement != "device":
                print(f"warning: the worker's model is at {worker.engine.report.placement}")
            for (name, items), naive in zip(workloads, naive_rows, strict=True):
                busy_before = worker.engine_busy_s
                row = await measure("worker", settings, items, _nothing)
                busy_s = worker.engine_busy_s - busy_before
                print(
                    f"| {name} | {naive['images_per_s']:.2f} | {row['images_per_s']:.2f} | "
                    f"{row['images_per_s'] / naive['images_per_s']:.2f}x | "
                    f"{busy_s / row['wall_s']:.1%} | "
                    f"{row['p50_ms'] / 1000:.2f} / {row['p99_ms'] / 1000:.2f} |",
                    flush=True,
                )


async def run_naive(
    args: argparse.Namespace,
    bootstrap: str,
    model: str,
    dtype: str,
    workloads: list[tuple[str, list[dict[str, Any]]]],
) -> list[dict[str, Any]]:
    """The naive service on one engine of its own (eager, as the seed's service ran), each
    workload on topics of its own."""
    engine: ImageEngine | None = None
    rows = []
    for _name, items in workloads:
        naive = worker_settings(args, bootstrap, model, dtype).replace(compile="off")
        await ensure_topics(naive.kafka, 3)
        if engine is None:
            engine = ImageEngine(naive.engine)
            engine.load()
            engine.warm_up()
        rows.append(await measure("naive", naive, items, _naive(naive, len(items), engine)))
    return rows


def _naive(settings: Settings, count: int, engine: ImageEngine) -> Any:
    return lambda: naive_service(settings, count, engine)


async def _nothing() -> None:
    return None


# -- warm-up of a restarted worker ------------------------------------------------------------


async def restart_warmup(args: argparse.Namespace, model: str, dtype: str) -> None:
    print("\nwarm-up of a restarted engine process, regional compile")
    cache = Path(tempfile.mkdtemp(prefix="zimage-compile-"))
    settings = engine_settings(
        model,
        args.device,
        dtype,
        compile="regional",
        compile_cache_dir=cache,
        warmup_size=min(args.size, 512),
    )
    for label in ("empty compile cache", "warm compile cache (restart)"):
        engine = EngineProcess(settings)
        await engine.start()
        report = engine.report
        print(f"  {label}: load {report.load_s:.1f} s, warm-up {report.warmup_s:.1f} s", flush=True)
        await engine.stop()


if __name__ == "__main__":
    main()
