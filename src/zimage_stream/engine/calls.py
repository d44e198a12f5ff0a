"""What crosses between the worker and its engine process: plain, picklable values.

Torch-free on purpose: the worker imports this module and never imports torch. Images
cross encoded (PNG, WebP or JPEG bytes, as they will be stored), never as pickled PIL
objects; errors cross as their contract code and message.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import InvalidRequestError, ZImageError, for_code
from ..schemas import ModelInfo, TextRegion

#: Z-Image's transformer pads each caption to a multiple of this many tokens, and masks
#: attention only when a batch's padded lengths differ
CAPTION_MULTIPLE = 32


@dataclass(frozen=True)
class GenerateJob:
    """One request's share of a pipeline call."""

    prompt: str
    num_images: int
    seed: int


@dataclass(frozen=True)
class BatchShape:
    """What every job of one pipeline call shares."""

    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float


@dataclass(frozen=True)
class LoadReport:
    """How the model was loaded: what ``/readyz`` and the start-up log show."""

    model_id: str
    revision: str | None
    device: str
    dtype: str
    attention_backend: str
    load_s: float
    #: why that backend: "set by ZIMAGE_ATTENTION_BACKEND", or what ``auto`` found
    attention_reason: str = ""
    warmup_s: float | None = None
    #: where the weights live: "device", "model_cpu_offload" (GPU memory ran out at load)
    #: or "cpu" (it ran out with offloading too)
    placement: str = "device"
    #: torch.compile applied: "off" or "regional" (the transformer's repeated blocks)
    compile: str = "off"
    #: the VAE's decoder compiled too
    compile_vae: bool = False
    #: the folder compiled kernels are kept in (None: a temporary one, or no compile)
    compile_cache: str | None = None
    #: "none" or "fp8" (what runs, which may be less than was asked), and why
    quantization: str = "none"
    quantization_reason: str = ""
    #: caption embeddings kept for repeated prompts (0 = off)
    prompt_cache_size: int = 0
    #: how many times the engine process was started again, why the last time ("crashed"
    #: or "hung") and how long that start took (seconds, load and warm-up)
    restarts: int = 0
    restart_reason: str | None = None
    restart_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def model_info(self) -> ModelInfo:
        """What made the images, as result events name it."""
        return ModelInfo(
            id=self.model_id, revision=self.revision, device=self.device, dtype=self.dtype
        )


@dataclass(frozen=True)
class WireError:
    """A contract error on its way across the boundary."""

    code: str
    message: str

    @classmethod
    def of(cls, error: ZImageError) -> WireError:
        return cls(error.code, error.message)

    def error(self) -> ZImageError:
        return for_code(self.code)(self.message)


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    width: int
    height: int


@dataclass
class JobResult:
    """One job's encoded images, or why it has none."""

    images: list[EncodedImage] | None = None
    error: ZImageError | None = None
    #: seconds from the call's start until this job was done (or given up)
    seconds: float = 0.0


@dataclass(frozen=True)
class Erased:
    """An erase call's cleaned image and the text it found."""

    image: EncodedImage
    regions: list[TextRegion]


@dataclass(frozen=True)
class Faults:
    """Faults the engine process injects, for tests: slow steps, running out of memory
    above an image count, and (for a job whose prompt contains the marker) a segfault, a
    call that never returns, or killing the worker process itself; or a crash or a hang
    while the model loads."""

    step_sleep_s: float = 0.0
    oom_over_images: int | None = None
    crash_on: str | None = None
    hang_on: str | None = None
    kill_worker_on: str | None = None
    #: "crash" or "hang" while loading the model, before it reports
    at_load: str | None = None


@dataclass(frozen=True)
class CaptionRule:
    """How long a styled prompt may be, counted the way the model's tokenizer counts it:
    the chat template's text around the prompt, and the tokenizer's own definition (the
    ``tokenizers`` JSON, readable without torch)."""

    limit: int
    prefix: str
    suffix: str
    tokenizer_json: str

    def tokens(self, prompt: str) -> int:
        return len(self._tokenizer.encode(self.prefix + prompt + self.suffix).ids)

    def check(self, prompt: str) -> int:
        """``prompt``'s caption length in tokens (styled, in its chat template); raise
        ``invalid_request`` when it is longer than the model takes.

        Past the limit the pipeline would cut the caption silently (losing the style text
        at its end) or, where the transformer has fewer caption positions, fail the whole
        batch; the request's own fault is better said before it is batched.
        """
        tokens = self.tokens(prompt)
        if tokens > self.limit:
            raise InvalidRequestError(
                f"params.prompt: {tokens} tokens with its style text and chat template; this "
                f"model takes at most {self.limit} (shorten the prompt)"
            )
        return tokens

    @functools.cached_property
    def _tokenizer(self) -> Any:
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self.tokenizer_json)


# -- messages: worker → engine process -------------------------------------------------


@dataclass(frozen=True)
class GenerateCall:
    call_id: int
    jobs: list[GenerateJob]
    shape: BatchShape
    budgets_s: list[float]
    image_format: str


@dataclass(frozen=True)
class EraseCall:
    call_id: int
    data: bytes
    engine: str
    languages: list[str]
    budget_s: float
    image_format: str


@dataclass(frozen=True)
class SetFaults:
    faults: Faults


# -- messages: engine process → worker -------------------------------------------------


@dataclass(frozen=True)
class Loaded:
    report: LoadReport
    caption: CaptionRule | None


@dataclass(frozen=True)
class LoadFailed:
    error: WireError


@dataclass(frozen=True)
class Started:
    """The call left the engine process's queue: its deadlines run from now."""

    call_id: int


@dataclass(frozen=True)
class Step:
    """A denoising step of a call finished (jobs: indices into the call's jobs)."""

    call_id: int
    jobs: list[int]
    step: int
    total: int


@dataclass(frozen=True)
class Done:
    call_id: int
    #: a GenerateCall's results in order, or an EraseCall's image
    results: list[JobResult] | Erased | None = None
    error: WireError | None = None
    #: what the out-of-memory and timeout ladder did during the call
    stats: dict[str, int] = field(default_factory=dict)
