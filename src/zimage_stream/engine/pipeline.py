"""The Z-Image-Turbo engine: load once, warm up, then generate batches of requests.

All methods block; the worker calls them from its single engine thread so the event loop
keeps heartbeating, fetching and publishing while the device works.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
import re
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog
import torch
from PIL import Image

from ..errors import ModelUnavailableError
from ..schemas import MAX_SEED, ModelInfo
from ..settings import EngineSettings
from .calls import BatchShape, CaptionRule, GenerateJob, LoadReport
from .compilation import (
    VAE_WARM_SIZES,
    WARM_CALLS,
    CompiledCalls,
    compile_vae_decoder,
    use_compile_cache,
)
from .device import (
    MASKLESS_BACKENDS,
    DeviceClock,
    free_device_memory,
    memory_summary,
    needs_padding_mask,
    resolve_device,
    resolve_dtype,
    select_attention_backend,
)
from .quantization import quantize_transformer
from .tiny import ensure_tiny_pipeline, is_tiny_model

log = structlog.get_logger(__name__)

StepCallback = Callable[[int, int], None]
"""Called after each denoising step with (step, total); raising aborts the call."""

FaultHook = Callable[[str, int], None]
"""Test seam: called as ("load", 0) before the weights are moved to the device, ("call",
images) before each pipeline call and ("step", step) after each denoising step; raising
there (``torch.OutOfMemoryError``, a sleep that runs a deadline out) injects a fault."""


class DeadlineExceeded(TimeoutError):
    """A pipeline call was stopped between two denoising steps: its deadline passed.

    A ``TimeoutError``, so a caller that must not import the engine (the eraser, around
    the diffusion inpainter it is given) still knows it for what it is."""

    def __init__(self, steps_done: int) -> None:
        super().__init__(f"deadline passed after {steps_done} denoising steps")
        self.steps_done = steps_done


class ImageEngine:
    """Owns the diffusers pipeline and runs generation on it."""

    def __init__(self, settings: EngineSettings) -> None:
        self._settings = settings
        self._pipe: Any = None
        self._report: LoadReport | None = None
        self._device = "cpu"
        self._counter: Any = None
        #: the longest caption (tokens) the loaded model takes whole
        self.caption_limit = MAX_CAPTION_TOKENS
        self._caption_rule: CaptionRule | None = None
        self.fault_hook: FaultHook | None = None
        #: caption embeddings of recent prompts (one model per engine, so the styled
        #: prompt is the whole key)
        self.prompt_cache = PromptCache(settings.prompt_cache_size)
        self.compiled = CompiledCalls(settings.compile == "regional")
        #: time the device spent in generate calls
        self.clock = DeviceClock("cpu")

    @property
    def loaded(self) -> bool:
        return self._report is not None

    @property
    def report(self) -> LoadReport:
        if self._report is None:
            raise RuntimeError("the engine is not loaded; call load() first")
        return self._report

    @property
    def pipeline(self) -> Any:
        """The loaded diffusers pipeline (for ``from_pipe`` derivatives)."""
        if self._pipe is None:
            raise RuntimeError("the engine is not loaded; call load() first")
        return self._pipe

    @property
    def model_info(self) -> ModelInfo:
        return self.report.model_info()

    def load(self) -> LoadReport:
        """Load the pipeline onto the chosen device with ``ZImagePipeline.from_pretrained``."""
        from diffusers import ZImagePipeline

        settings = self._settings
        started = time.perf_counter()
        source = _model_source(settings)
        self._device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype)
        if self._device == "cpu":
            # Leave a core to the event loop: cache hits and publishing must not queue
            # behind the model's threads.
            torch.set_num_threads(settings.cpu_threads or max(1, (os.cpu_count() or 2) - 1))
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*torch_dtype.*")
                pipe = ZImagePipeline.from_pretrained(
                    source, torch_dtype=dtype, revision=settings.model_revision
                )
        except (OSError, ValueError) as exc:
            raise ModelUnavailableError(f"cannot load model {settings.model!r}: {exc}") from exc
        placement = self._place(pipe)
        self.clock = DeviceClock(self._device)
        # Channels-last convolutions: on the CPU a single-image bf16 decode in NCHW is about
        # ten times slower (oneDNN), and on CUDA it is the layout the conv kernels prefer.
        pipe.vae.to(memory_format=torch.channels_last)
        pipe.set_progress_bar_config(disable=True)
        quantization, quantization_reason = quantize_transformer(
            pipe.transformer, settings.quantization, self._device
        )
        backend, backend_reason = self._set_attention_backend(pipe)
        compile_cache = self._compile(pipe)
        self._pipe = pipe
        # The caption counter's own tokenizer: a fast tokenizer changes its padding and
        # truncation state on every call, so the event loop must not share the pipeline's.
        self._counter = copy.deepcopy(pipe.tokenizer)
        self.caption_limit = _caption_limit(pipe)
        self._report = LoadReport(
            model_id=settings.model,
            revision=_model_revision(settings, pipe),
            device=self._device,
            dtype=settings.dtype,
            attention_backend=backend,
            attention_reason=backend_reason,
            load_s=round(time.perf_counter() - started, 3),
            placement=placement,
            compile=settings.compile,
            compile_vae=settings.compile == "regional" and settings.compile_vae,
            compile_cache=compile_cache,
            quantization=quantization,
            quantization_reason=quantization_reason,
            prompt_cache_size=settings.prompt_cache_size,
        )
        log.info("model_loaded", **self._report.as_dict())
        return self._report

    def _set_attention_backend(self, pipe: Any) -> tuple[str, str]:
        """Set the attention backend ``ZIMAGE_ATTENTION_BACKEND`` asks for; one that
        ``auto`` chose and diffusers refuses falls back to SDPA, with the reason."""
        requested = self._settings.attention_backend
        backend, reason = select_attention_backend(requested, self._device)
        if backend == "native":
            return backend, reason
        try:
            pipe.transformer.set_attention_backend(backend)
        except (RuntimeError, ValueError) as exc:
            if requested != "auto":
                raise ModelUnavailableError(
                    f"ZIMAGE_ATTENTION_BACKEND={requested} cannot run here: {exc}"
                ) from exc
            log.warning("attention_backend_refused", backend=backend, error=str(exc)[:200])
            return "native", f"auto: {backend} refused by diffusers ({str(exc)[:120]}); SDPA"
        return backend, reason

    def _compile(self, pipe: Any) -> str | None:
        """Compile what ``ZIMAGE_COMPILE`` asks for (graphs are made at warm-up, see
        ``compilation``); returns the compile cache folder in use."""
        settings = self._settings
        if settings.compile != "regional":
            return None
        cache = use_compile_cache(settings.compile_cache_dir)
        pipe.transformer.compile_repeated_blocks(fullgraph=True)
        if settings.compile_vae:
            compile_vae_decoder(pipe.vae)
        log.info("transformer_compile", mode="regional", vae=settings.compile_vae, cache=cache)
        return cache

    def check_caption(self, prompt: str) -> None:
        """Raise ``invalid_request`` when ``prompt`` (styled) is longer than the model takes
        (``CaptionRule.check``)."""
        if self._caption_rule is None:
            self._caption_rule = self.caption_rule()
        self._caption_rule.check(prompt)

    def caption_rule(self) -> CaptionRule:
        """``check_caption``'s rule as plain data, for a process that does not load torch:
        the chat template's text around a prompt and the tokenizer's own definition."""
        marker = "\x00prompt\x00"
        templated = self._counter.apply_chat_template(
            [{"role": "user", "content": marker}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=True,
        )
        prefix, suffix = templated.split(marker)
        return CaptionRule(
            self.caption_limit, prefix, suffix, self._counter.backend_tokenizer.to_str()
        )

    def _place(self, pipe: Any) -> str:
        """Move the weights to the device; when its memory runs out, fall back to model CPU
        offload (weights on the host, each model moved over while it runs), then to the CPU."""
        try:
            self._fault("load", 0)
            pipe.to(self._device)
            return "device"
        except torch.OutOfMemoryError as exc:
            log.error("load_out_of_memory", device=self._device, error=str(exc)[:200])
            pipe.to("cpu")
            free_device_memory(self._device)
        if self._device != "cpu":
            try:
                pipe.enable_model_cpu_offload(device=self._device)
                log.warning("model_cpu_offload", device=self._device)
                return "model_cpu_offload"
            except torch.OutOfMemoryError as exc:
                log.error("offload_out_of_memory", device=self._device, error=str(exc)[:200])
                pipe.remove_all_hooks()
                pipe.to("cpu")
                free_device_memory(self._device)
        log.warning("model_on_cpu", wanted=self._device)
        self._device = "cpu"
        return "cpu"

    def _fault(self, where: str, value: int) -> None:
        if self.fault_hook is not None:
            self.fault_hook(where, value)

    def warm_up(self) -> LoadReport:
        """Small generations, so the first request pays no first-call costs: one, or with
        ``ZIMAGE_COMPILE`` the calls that make every graph (``compilation.WARM_CALLS``)."""
        started = time.perf_counter()
        size = self._settings.warmup_size
        if self.compiled.enabled:
            self.run_warm_calls(WARM_CALLS, size, steps=1)
        else:
            self.run_warm_calls(WARM_CALLS[:1], size, steps=2)
        if self.compiled.enabled and self._settings.compile_vae:
            self._warm_decoder()
        self.compiled.warmed()
        warmup_s = round(time.perf_counter() - started, 3)
        self._report = replace(self.report, warmup_s=warmup_s)
        log.info("model_warmed_up", warmup_s=warmup_s, **memory_summary(self._device))
        return self._report

    def run_warm_calls(
        self, calls: tuple[tuple[int, str, int], ...], size: int, steps: int
    ) -> None:
        """Generate ``calls`` (``compilation.WARM_CALLS``' form) at ``size``."""
        for images, prompt, taller in calls:
            shape = BatchShape(size, size + taller, num_inference_steps=steps, guidance_scale=0.0)
            self.generate([GenerateJob(prompt, num_images=images, seed=0)], shape)

    def _warm_decoder(self) -> None:
        vae = self._pipe.vae
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        for size in VAE_WARM_SIZES:
            latent = torch.zeros(
                vae.config.latent_channels, size // scale, size // scale, device=vae.device
            )
            self._decode(latent)

    def generate(
        self,
        jobs: list[GenerateJob],
        shape: BatchShape,
        on_step: StepCallback | None = None,
        deadline: float | None = None,
    ) -> list[list[Image.Image]]:
        """Run one pipeline call for all ``jobs``; return each job's images in order.

        ``deadline`` (``time.monotonic()``): past it, the call stops after the current
        denoising step (or before the next image's decode) with ``DeadlineExceeded``.
        """
        pipe = self._pipe
        if pipe is None:
            raise RuntimeError("the engine is not loaded; call load() first")
        with self.clock.timing():
            return self._generate(pipe, jobs, shape, on_step, deadline)

    def _generate(
        self,
        pipe: Any,
        jobs: list[GenerateJob],
        shape: BatchShape,
        on_step: StepCallback | None,
        deadline: float | None,
    ) -> list[list[Image.Image]]:
        # 1. Encode each distinct prompt once, however many requests and images share it.
        prompt_embeds, negative_embeds = self._encode_prompts(jobs, shape)
        # 2. Denoise all images in one call (one generator per image: image i of a job
        # uses seed + i), on the compiled graphs when they cover this shape.
        self._fault("call", len(prompt_embeds))
        # With guidance the negative captions run in the same batch: they count too.
        captions = [int(e.shape[0]) for e in prompt_embeds + negative_embeds]
        with self._attention_for(captions):
            latents = self.compiled.run(
                lambda: (
                    pipe(
                        prompt=None,
                        prompt_embeds=prompt_embeds,
                        negative_prompt_embeds=negative_embeds,
                        height=shape.height,
                        width=shape.width,
                        num_inference_steps=shape.num_inference_steps,
                        guidance_scale=shape.guidance_scale,
                        generator=_generators(jobs),
                        output_type="latent",
                        callback_on_step_end=self.step_callback(
                            on_step, shape.num_inference_steps, deadline
                        ),
                    ).images
                ),
                f"{len(prompt_embeds)}x{shape.width}x{shape.height}",
            )
        # 3. Decode image by image and hand each job its own images.
        images = []
        for latent in latents:
            _check(deadline, shape.num_inference_steps)
            images.append(self.compiled.run(functools.partial(self._decode, latent), "decode"))
        result, start = [], 0
        for job in jobs:
            result.append(images[start : start + job.num_images])
            start += job.num_images
        return result

    @torch.no_grad()
    def _decode(self, latent: torch.Tensor) -> Image.Image:
        # One image at a time: a batched VAE decode rounds differently with the batch's size
        # (seen in bf16), so per-image decoding keeps an image's bytes independent of which
        # requests it was batched with, and bounds the decoder's peak memory.
        vae = self._pipe.vae
        latent = latent.unsqueeze(0).to(vae.dtype)
        latent = latent / vae.config.scaling_factor + vae.config.shift_factor
        latent = latent.contiguous(memory_format=torch.channels_last)
        decoded = vae.decode(latent, return_dict=False)[0]
        image: Image.Image = self._pipe.image_processor.postprocess(decoded, output_type="pil")[0]
        return image

    def free_memory(self) -> None:
        free_device_memory(self._device)

    def _encode_prompts(
        self, jobs: list[GenerateJob], shape: BatchShape
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        by_prompt = {
            prompt: self._embedding(prompt) for prompt in dict.fromkeys(j.prompt for j in jobs)
        }
        per_image = [by_prompt[job.prompt] for job in jobs for _ in range(job.num_images)]
        if shape.guidance_scale <= 0:
            return per_image, []
        negative = self._embedding("")  # the pipeline's default negative prompt
        return per_image, [negative] * len(per_image)

    def _embedding(self, prompt: str) -> torch.Tensor:
        """``prompt``'s caption embedding, from the prompt cache or encoded alone: a batch
        of one, so that it never depends on which prompts it was encoded with (the text
        encoder's kernels round differently with the batch size) and a cached embedding
        is the one that would have been computed."""
        cached = self.prompt_cache.get(prompt)
        if cached is not None:
            return cached
        # _encode_prompt rewrites its list in place (chat template): a list of its own.
        (embedding,) = self._pipe._encode_prompt(
            prompt=[prompt], device=self._pipe._execution_device
        )
        self.prompt_cache.put(prompt, embedding)
        return embedding

    def step_callback(
        self, on_step: StepCallback | None, total: int, deadline: float | None
    ) -> Callable[..., dict[str, Any]]:
        """A ``callback_on_step_end`` for a pipeline call on this engine's modules: the
        fault hook's ("step", step), then ``on_step``, then ``DeadlineExceeded`` once
        ``deadline`` (``time.monotonic()``) has passed."""

        # Raising here stops the denoising loop at once; setting the pipeline's
        # ``_interrupt`` would still run the remaining bookkeeping and the VAE decode.
        def callback(_pipe: Any, step: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            self._fault("step", step + 1)
            if on_step is not None:
                on_step(step + 1, total)
            _check(deadline, step + 1)
            return kwargs

        return callback

    def _attention_for(self, caption_lengths: list[int]) -> _AttentionScope:
        backend = self.report.attention_backend
        # Flash kernels take no padding mask: such batches go through SDPA instead.
        if backend in MASKLESS_BACKENDS and needs_padding_mask(caption_lengths):
            return _AttentionScope(self._pipe.transformer, "native", backend)
        return _AttentionScope(self._pipe.transformer, None, backend)


class PromptCache:
    """The ``size`` most recently used caption embeddings, by styled prompt (0 = off).

    Style presets make prompts repeat, and the text encoder (Qwen3-4B on Z-Image-Turbo)
    encodes 512 padded tokens for each. Embeddings stay on the model's device."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, prompt: str) -> torch.Tensor | None:
        entry = self._entries.get(prompt)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(prompt)
        self.hits += 1
        return entry

    def put(self, prompt: str, embedding: torch.Tensor) -> None:
        if self.size <= 0:
            return
        self._entries[prompt] = embedding
        self._entries.move_to_end(prompt)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class _AttentionScope:
    """Switch the transformer's attention backend for one call, then switch it back."""

    def __init__(self, transformer: Any, temporary: str | None, usual: str) -> None:
        self._transformer, self._temporary, self._usual = transformer, temporary, usual

    def __enter__(self) -> None:
        if self._temporary is not None:
            self._transformer.set_attention_backend(self._temporary)

    def __exit__(self, *exc: object) -> None:
        if self._temporary is not None:
            self._transformer.set_attention_backend(self._usual)


def _generators(jobs: list[GenerateJob]) -> list[torch.Generator]:
    return [
        torch.Generator(device="cpu").manual_seed((job.seed + i) % (MAX_SEED + 1))
        for job in jobs
        for i in range(job.num_images)
    ]


def _check(deadline: float | None, steps_done: int) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded(steps_done)


#: tokens the pipeline encodes per caption (it cuts longer captions silently)
MAX_CAPTION_TOKENS = 512
#: the transformer pads captions to a multiple of this
CAPTION_PAD_MULTIPLE = 32


def _caption_limit(pipe: Any) -> int:
    """The longest caption, in tokens, the loaded model takes whole: the pipeline's cut,
    and the transformer's first positional axis, which holds the padded caption, then the
    image (1 + padded caption + 1 positions must fit; 224 tokens on the miniature model)."""
    axis = int(pipe.transformer.config.axes_lens[0])
    fits = (axis - 2) // CAPTION_PAD_MULTIPLE * CAPTION_PAD_MULTIPLE
    return min(MAX_CAPTION_TOKENS, fits)


def _model_source(settings: EngineSettings) -> str:
    if is_tiny_model(settings.model):
        return str(ensure_tiny_pipeline(settings.tiny_model_dir))
    return settings.model


_SNAPSHOT = re.compile(r"/snapshots/([0-9a-f]{40})")


def _model_revision(settings: EngineSettings, pipe: Any) -> str | None:
    """The revision that was loaded: the hub commit, or a digest of a local folder."""
    if settings.model_revision:
        return settings.model_revision
    path = str(pipe.config.get("_name_or_path", ""))
    if match := _SNAPSHOT.search(path):
        return match.group(1)
    folder = Path(path)
    if folder.is_dir():
        return "local-" + _folder_digest(folder)
    return None


def _folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(folder)).encode())
        with file.open("rb") as handle:
            digest.update(handle.read(1 << 16))
        digest.update(str(file.stat().st_size).encode())
    return digest.hexdigest()[:12]
