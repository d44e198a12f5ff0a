"""A miniature Z-Image pipeline with random weights, built locally and saved as a diffusers folder.

It has the real architecture in miniature (the diffusers test sizes: a ``dim=32`` two-layer
transformer, a two-layer Qwen3 text encoder) and a four-block VAE that, like the real one,
downsamples by 8, so the image-token counts per image size match Z-Image-Turbo's. The
tokenizer is a byte-level BPE trained here with ``tokenizers`` on a few product phrases, so
nothing is downloaded. The folder loads through the same ``ZImagePipeline.from_pretrained``
call as the real model, which is the point: tests and the demo exercise the real loading code.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

TINY_MODEL_NAME = "tiny"
_MARKER = "zimage_tiny.json"
_BUILD_VERSION = 2

# A Qwen3-style chat template: Z-Image's pipeline formats every prompt through it.
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "a ceramic coffee mug on a wooden table",
    "wireless headphones, studio product photo, white background",
    "running shoes in natural daylight, shallow depth of field",
    "luxury watch on a dark glossy surface with rim lighting",
    "a linen sofa in a modern Scandinavian living room",
    "festive gift box with ribbons and warm bokeh lights",
    "smartphone with neon accents in a futuristic tech scene",
    "限时特惠 新品上市 包邮 正品保证 SALE 50% OFF",
]


def is_tiny_model(name: str) -> bool:
    return name == TINY_MODEL_NAME


def ensure_tiny_pipeline(directory: Path) -> Path:
    """Build the miniature pipeline into ``directory`` unless a complete one is already there."""
    marker = directory / _MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("version") == _BUILD_VERSION:
        return directory
    build_tiny_pipeline(directory)
    return directory


def build_tiny_pipeline(directory: Path, seed: int = 0) -> Path:
    """Build the miniature pipeline with seeded random weights and save it to ``directory``.

    It is written to a sibling folder and renamed into place, so a process that loads the
    folder while another builds it never sees half of it.
    """
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    tokenizer = _train_tokenizer()
    torch.manual_seed(seed)
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae(),
        text_encoder=_tiny_text_encoder(len(tokenizer)),
        tokenizer=tokenizer,
        transformer=_tiny_transformer(),
    )
    staging = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging)
    (staging / _MARKER).write_text(json.dumps({"version": _BUILD_VERSION, "seed": seed}))
    directory.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(staging, directory)
    return directory


def _tiny_transformer():  # type: ignore[no-untyped-def]
    """The diffusers test transformer: dim 32, two layers, two heads."""
    import torch
    from diffusers import ZImageTransformer2DModel

    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=16,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[8, 4, 4],
        axes_lens=[256, 128, 128],
    )
    with torch.no_grad():
        # Created with torch.empty upstream: fix them so the saved weights hold no NaNs.
        for name in ("x_pad_token", "cap_pad_token"):
            token = getattr(transformer, name)
            token.copy_(torch.ones_like(token))
    return transformer


def _tiny_vae():  # type: ignore[no-untyped-def]
    """Four blocks, so it downsamples by 8 like Z-Image's VAE; 16 latent channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[16, 16, 16, 16],
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )


def _tiny_text_encoder(vocab_size: int):  # type: ignore[no-untyped-def]
    """A two-layer Qwen3 (Z-Image's text encoder family) with hidden size 16."""
    from transformers import Qwen3Config, Qwen3Model

    return Qwen3Model(
        Qwen3Config(
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=vocab_size,
            max_position_embeddings=512,
        )
    )


def _train_tokenizer():  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=_CHAT_TEMPLATE,
        model_max_length=512,
    )
