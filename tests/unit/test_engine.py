"""The engine on the miniature model: real diffusers loading and generation on the CPU."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zimage_stream.engine import BatchShape, GenerateJob, ImageEngine, device
from zimage_stream.engine.compilation import CompiledCalls
from zimage_stream.engine.device import needs_padding_mask, select_attention_backend
from zimage_stream.engine.pipeline import PromptCache
from zimage_stream.engine.quantization import fp8_targets, fp8_unavailable
from zimage_stream.errors import ModelUnavailableError, ZImageError
from zimage_stream.settings import EngineSettings

SMALL = BatchShape(width=256, height=256, num_inference_steps=4, guidance_scale=0.0)


def _engine(tiny_model_dir: Path, dtype: str) -> ImageEngine:
    engine = ImageEngine(EngineSettings(model="tiny", dtype=dtype, tiny_model_dir=tiny_model_dir))
    engine.load()
    return engine


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> ImageEngine:
    return _engine(tiny_model_dir, "float32")


@pytest.fixture(scope="module")
def bf16_engine(tiny_model_dir: Path) -> ImageEngine:
    return _engine(tiny_model_dir, "bfloat16")


def _flat(nested: list[list[Image.Image]]) -> list[Image.Image]:
    return [image for images in nested for image in images]


def _pixels(image) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.asarray(image)


def test_load_report_says_what_was_loaded(engine: ImageEngine) -> None:
    report = engine.report
    assert (report.model_id, report.device, report.dtype) == ("tiny", "cpu", "float32")
    assert report.attention_backend == "native"
    assert report.revision is not None and report.revision.startswith("local-")
    assert report.load_s > 0
    warmed = engine.warm_up()
    assert warmed.warmup_s is not None and warmed.warmup_s > 0
    assert engine.model_info.id == "tiny"


def test_each_job_gets_its_images_at_the_asked_size(engine: ImageEngine) -> None:
    out = engine.generate(
        [GenerateJob("a mug", 2, 1), GenerateJob("a lamp", 3, 2)], BatchShape(320, 256, 2, 0.0)
    )
    assert [len(images) for images in out] == [2, 3]
    assert all(image.size == (320, 256) for images in out for image in images)


def test_same_seed_same_pixels_and_other_seed_other_pixels(engine: ImageEngine) -> None:
    first = engine.generate([GenerateJob("a mug", 1, 42)], SMALL)[0][0]
    again = engine.generate([GenerateJob("a mug", 1, 42)], SMALL)[0][0]
    other = engine.generate([GenerateJob("a mug", 1, 43)], SMALL)[0][0]
    assert np.array_equal(_pixels(first), _pixels(again))
    assert not np.array_equal(_pixels(first), _pixels(other))


def test_every_image_has_its_own_seed(bf16_engine: ImageEngine) -> None:
    pair = bf16_engine.generate([GenerateJob("a mug", 2, 100)], SMALL)[0]
    second_alone = bf16_engine.generate([GenerateJob("a mug", 1, 101)], SMALL)[0][0]
    assert not np.array_equal(_pixels(pair[0]), _pixels(pair[1]))
    assert np.array_equal(_pixels(pair[1]), _pixels(second_alone))


def test_batching_does_not_change_an_image_in_bf16(bf16_engine: ImageEngine) -> None:
    # Same caption-length bucket: no attention mask, per-image VAE decode.
    alone = bf16_engine.generate([GenerateJob("a mug", 1, 5)], SMALL)[0][0]
    batched = bf16_engine.generate(
        [GenerateJob("a cup", 2, 9), GenerateJob("a mug", 1, 5), GenerateJob("a mug", 1, 6)], SMALL
    )[1][0]
    assert np.array_equal(_pixels(alone), _pixels(batched))


def test_each_distinct_prompt_is_encoded_once_and_alone(
    engine: ImageEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = engine._pipe
    calls: list[list[str]] = []
    original = pipe._encode_prompt

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(list(kwargs["prompt"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(pipe, "_encode_prompt", spy)
    jobs = [GenerateJob("a tin mug", 2, 1), GenerateJob("a brass lamp", 1, 2)]
    engine.generate([*jobs, GenerateJob("a tin mug", 1, 3)], BatchShape(256, 256, 1, 0.0))
    assert len(calls) == 2 and sorted(calls) == [["a brass lamp"], ["a tin mug"]]
    engine.generate(jobs, BatchShape(256, 256, 1, 0.0))  # both cached now
    assert len(calls) == 2


def test_guidance_above_zero_runs_classifier_free_guidance(engine: ImageEngine) -> None:
    plain = engine.generate([GenerateJob("a mug", 1, 7)], SMALL)[0][0]
    guided = engine.generate([GenerateJob("a mug", 1, 7)], BatchShape(256, 256, 4, 3.0))[0][0]
    assert not np.array_equal(_pixels(plain), _pixels(guided))


def test_step_callback_sees_every_step(engine: ImageEngine) -> None:
    steps: list[tuple[int, int]] = []
    engine.generate([GenerateJob("a mug", 1, 7)], SMALL, on_step=lambda s, t: steps.append((s, t)))
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_a_missing_model_is_model_unavailable(tmp_path: Path) -> None:
    engine = ImageEngine(EngineSettings(model=str(tmp_path / "nope"), dtype="float32"))
    with pytest.raises(ModelUnavailableError) as info:
        engine.load()
    assert info.value.retriable


def test_attention_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    assert select_attention_backend("auto", "cpu") == ("native", "auto: PyTorch SDPA on cpu")
    assert select_attention_backend("_native_flash", "cuda")[0] == "_native_flash"
    # auto on CUDA: a FlashAttention kernel diffusers can use, else SDPA; and why.
    usable = {"fa3": False, "fa2": False}
    monkeypatch.setattr(device, "_flash_attn_3", lambda: usable["fa3"])
    monkeypatch.setattr(device, "_flash_attn_2", lambda: usable["fa2"])
    capability = (9, 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: capability)
    assert select_attention_backend("auto", "cuda") == (
        "native",
        "auto: PyTorch SDPA on sm90 (no usable flash-attn package)",
    )
    usable["fa2"] = True
    assert select_attention_backend("auto", "cuda") == ("flash", "auto: FlashAttention 2 on sm90")
    usable["fa3"] = True
    assert select_attention_backend("auto", "cuda")[0] == "_flash_3"
    capability = (8, 6)  # FlashAttention 3 is for Hopper
    assert select_attention_backend("auto", "cuda")[0] == "flash"
    capability = (7, 5)  # and FlashAttention 2 for Ampere and newer
    assert select_attention_backend("auto", "cuda")[0] == "native"
    assert not needs_padding_mask([10, 20, 32])  # all pad to 32 tokens
    assert needs_padding_mask([10, 40])


def test_fp8_takes_the_blocks_projections_and_leaves_the_rest(engine: ImageEngine) -> None:
    transformer = engine.pipeline.transformer
    targets = fp8_targets(transformer)
    linear = {n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    kept = linear - set(targets)
    for block in ("layers.0", "noise_refiner.0", "context_refiner.0"):
        for layer in ("to_q", "to_k", "to_v", "to_out.0"):
            assert f"{block}.attention.{layer}" in targets
        for layer in ("w1", "w2", "w3"):
            ff = transformer.get_submodule(f"{block}.feed_forward.{layer}")
            # float8 matmuls take sides that are multiples of 16 (the real model's all
            # are; the miniature's feed-forward is not)
            fits = ff.in_features % 16 == 0 and ff.out_features % 16 == 0
            assert (f"{block}.feed_forward.{layer}" in targets) == fits
    assert all(
        "adaLN" in name or "embedder" in name or "final_layer" in name or "feed_forward" in name
        for name in kept
    ), kept
    assert any("adaLN" in name for name in kept) and any("final_layer" in name for name in kept)


def test_fp8_where_it_cannot_run_is_reported_not_fatal(tiny_model_dir: Path) -> None:
    engine = ImageEngine(
        EngineSettings(
            model="tiny", dtype="float32", tiny_model_dir=tiny_model_dir, quantization="fp8"
        )
    )
    report = engine.load()
    assert report.quantization == "none"
    reason = "fp8 needs ZIMAGE_DTYPE=bfloat16 (the model runs in torch.float32)"
    assert report.quantization_reason == reason
    assert engine.generate([GenerateJob("a mug", 1, 0)], BatchShape(64, 64, 1, 0.0))
    assert fp8_unavailable("cpu", torch.bfloat16) == "fp8 needs a CUDA device (running on cpu)"


def test_compiled_graphs_made_at_warm_up_cover_new_shapes_and_are_kept_on_disk(
    engine: ImageEngine, tiny_model_dir: Path, tmp_path: Path
) -> None:
    compiled = ImageEngine(
        EngineSettings(
            model="tiny",
            dtype="float32",
            tiny_model_dir=tiny_model_dir,
            compile="regional",
            compile_cache_dir=tmp_path / "compiled",
            warmup_size=64,
        )
    )
    report = compiled.load()
    assert report.compile == "regional" and engine.report.compile == "off"
    assert report.compile_cache == str(tmp_path / "compiled")
    compiled.warm_up()
    assert any((tmp_path / "compiled" / "inductor").rglob("*.py"))  # kernels on disk
    # Batch sizes, image sizes and caption lengths the warm-up never ran, one caption bucket
    # per call as the worker batches: no compile, no miss, the same pictures.
    shape = BatchShape(width=96, height=128, num_inference_steps=2, guidance_scale=0.0)
    for jobs in (
        [GenerateJob("a mug", 2, 3), GenerateJob("a cup", 1, 4)],
        [GenerateJob("a red mug on a desk " * 6, 3, 5)],
    ):
        fast = compiled.generate(jobs, shape)
        assert compiled.compiled.misses == 0
        _assert_same_pictures(fast, engine.generate(jobs, shape))
    # Captions of two buckets in one call need an attention mask: a graph the warm-up did
    # not make, so the call runs eager and is counted, and draws the same pictures.
    mixed = [GenerateJob("a mug", 1, 3), GenerateJob("a red mug on a desk " * 6, 1, 4)]
    fast = compiled.generate(mixed, shape)
    assert compiled.compiled.misses == 1
    _assert_same_pictures(fast, engine.generate(mixed, shape))


def _assert_same_pictures(ours: list[list[Image.Image]], theirs: list[list[Image.Image]]) -> None:
    for a, b in zip(_flat(ours), _flat(theirs), strict=True):
        assert np.abs(_pixels(a).astype(int) - _pixels(b).astype(int)).max() <= 2  # rounding


def test_a_call_the_graphs_do_not_cover_runs_eager_and_is_counted() -> None:
    double = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    calls = CompiledCalls(enabled=True)
    assert calls.run(lambda: double(torch.ones(2)), "2").tolist() == [2, 2]
    calls.warmed()
    assert calls.run(lambda: double(torch.ones(2)), "2").tolist() == [2, 2]
    assert calls.misses == 0
    assert calls.run(lambda: double(torch.ones(3)), "3").tolist() == [2, 2, 2]
    assert calls.misses == 1


def test_a_caption_longer_than_the_model_takes_is_refused_before_it_runs(
    engine: ImageEngine,
) -> None:
    # The miniature transformer holds 224 caption tokens (the real model: 512, where the
    # pipeline cuts captions).
    assert engine.caption_limit == 224
    fits, too_long = "x " * 104, "x " * 105  # 224 and 226 tokens once templated
    engine.check_caption(fits)
    engine.generate([GenerateJob(fits, 1, 0)], BatchShape(64, 64, 1, 0.0))
    with pytest.raises(ZImageError) as refused:
        engine.check_caption(too_long)
    assert refused.value.code == "invalid_request" and "at most 224" in refused.value.message
    with pytest.raises(IndexError):  # what the model does with it
        engine.generate([GenerateJob(too_long, 1, 0)], BatchShape(64, 64, 1, 0.0))


def test_the_caption_rule_counts_as_the_pipelines_tokenizer_does(tiny_engine: ImageEngine) -> None:
    """The worker checks captions without torch, from the rule the engine process sends."""
    rule = pickle.loads(pickle.dumps(tiny_engine.caption_rule()))  # as it crosses the pipe
    counter = tiny_engine._counter
    for prompt in ["a mug", "一个白色的杯子 on a desk, studio light", "a long mug " * 60]:
        templated = counter.apply_chat_template(
            [{"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=True,
        )
        assert rule.tokens(prompt) == len(counter(templated).input_ids), prompt
    assert rule.limit == tiny_engine.caption_limit


def test_the_prompt_cache_skips_the_text_encoder_and_changes_no_pixel(
    tiny_model_dir: Path,
) -> None:
    """In bf16, where rounding shows: images made from cached embeddings are bit-identical
    to those of an engine without the cache, and repeated prompts are not encoded again."""

    def engine(cache_size: int) -> ImageEngine:
        settings = EngineSettings(
            model="tiny",
            dtype="bfloat16",
            tiny_model_dir=tiny_model_dir,
            prompt_cache_size=cache_size,
        )
        loaded = ImageEngine(settings)
        loaded.load()
        return loaded

    cached, plain = engine(8), engine(0)
    shape = BatchShape(width=256, height=256, num_inference_steps=2, guidance_scale=0.0)
    jobs = [GenerateJob("a white mug, studio light", 1, 7), GenerateJob("a desk lamp", 2, 8)]
    cached.generate(jobs, shape)  # encodes both prompts, once each
    from_cache = cached.generate(jobs, shape)
    computed = plain.generate(jobs, shape)
    for ours, theirs in zip(from_cache, computed, strict=True):
        for mine, other in zip(ours, theirs, strict=True):
            assert np.array_equal(np.asarray(mine), np.asarray(other))
    assert (cached.prompt_cache.hits, cached.prompt_cache.misses) == (2, 2)
    assert len(plain.prompt_cache) == 0 and cached.report.prompt_cache_size == 8


def test_the_prompt_cache_forgets_the_least_recently_used() -> None:
    cache = PromptCache(2)
    for prompt in ("a", "b"):
        cache.put(prompt, torch.zeros(1))
    assert cache.get("a") is not None  # "b" is now the least recently used
    cache.put("c", torch.ones(1))
    assert cache.get("b") is None and cache.get("a") is not None and len(cache) == 2
