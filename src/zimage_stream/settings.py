"""Worker settings: read once from ``ZIMAGE_*`` variables at the edge (``cli.py``).

Each setting is declared once, with its bounds, in the section that uses it
(``KafkaSettings``, ``CacheSettings``, ``StorageSettings``, ``EngineSettings``,
``BatchSettings``, ``OcrSettings``); the worker's parts take their section and nothing
else. A field's *flat name* is its alias where it has one, else its own name, and
``ZIMAGE_`` plus the flat name in capitals is its environment variable: the names
``docs/CONTRACT.md`` binds (``ZIMAGE_REQUESTS_TOPIC``, ``ZIMAGE_BATCH_WINDOW_MS``...)
keep their flat spelling while the code reads ``settings.kafka.requests_topic``.

``Settings(**flat)`` and ``settings.replace(**flat)`` take flat names too (tests, the
demo, the benchmarks). The library never reads the environment itself.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_MODEL = "Tongyi-MAI/Z-Image-Turbo"
ENV_PREFIX = "ZIMAGE_"

Device = Literal["auto", "cuda", "mps", "cpu"]
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
DType = Literal["bfloat16", "float16", "float32"]
AttentionBackend = Literal["auto", "native", "flash", "_native_flash", "_flash_3", "_native_cudnn"]
CompileMode = Literal["off", "regional"]


class _Section(BaseModel):
    """A group of settings; built from flat names or from its own field names."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @classmethod
    def flat_names(cls) -> dict[str, str]:
        """Flat name -> field name, for every field of the section."""
        return {_flat_name(name, info): name for name, info in cls.model_fields.items()}

    def flat(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True)


def _flat_name(name: str, info: FieldInfo) -> str:
    return info.alias or name


class KafkaSettings(_Section):
    """Where the worker reads requests and writes results, and how it talks to Kafka."""

    bootstrap_servers: str = Field(default="localhost:9092", alias="kafka_bootstrap_servers")
    requests_topic: str = "zimage.requests"
    results_topic: str = "zimage.results"
    dlq_topic: str = "zimage.requests.dlq"
    # Step progress events, keyed by request_id (empty = none are sent).
    progress_topic: str = ""
    group_id: str = "zimage-workers"
    client_id: str = Field(default="zimage-stream", alias="kafka_client_id")
    max_message_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    create_topics: bool = True
    topic_partitions: int = Field(default=6, ge=1)
    # Copies of each created topic's log: 1 suits one broker; a production cluster wants
    # 3 (and a min.insync.replicas of 2 refuses writes to a topic with fewer).
    topic_replication_factor: int = Field(default=1, ge=1, le=32)
    session_timeout_ms: int = Field(default=30_000, ge=1000, alias="kafka_session_timeout_ms")
    max_poll_interval_ms: int = Field(default=600_000, ge=1000, alias="kafka_max_poll_interval_ms")
    # How long the broker may hold a fetch open when no records are there: Kafka's own
    # default. Apache Kafka answers as soon as records arrive; the embedded Tansu broker
    # does not, so the demo, tests and benches set it low (``broker.FETCH_MAX_WAIT_MS``).
    fetch_max_wait_ms: int = Field(default=500, ge=0, le=10_000, alias="kafka_fetch_max_wait_ms")
    # Kafka security: TLS (CA, and a client certificate for mutual TLS) and SASL.
    security_protocol: SecurityProtocol = Field(
        default="PLAINTEXT", alias="kafka_security_protocol"
    )
    sasl_mechanism: SaslMechanism = Field(default="PLAIN", alias="kafka_sasl_mechanism")
    sasl_username: str | None = Field(default=None, alias="kafka_sasl_username")
    sasl_password: str | None = Field(default=None, alias="kafka_sasl_password", repr=False)
    ssl_cafile: Path | None = Field(default=None, alias="kafka_ssl_cafile")
    ssl_certfile: Path | None = Field(default=None, alias="kafka_ssl_certfile")
    ssl_keyfile: Path | None = Field(default=None, alias="kafka_ssl_keyfile")

    @property
    def request_limit_bytes(self) -> int:
        """The most bytes one Kafka request (a produce of one record, one partition's
        fetch) may take: the largest record plus room for the batch and its headers."""
        return self.max_message_bytes + 64 * 1024


def _redis_url(url: str) -> str:
    # Checked here, so that the error names ZIMAGE_REDIS_URL (redis-py's own does not).
    if url and not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("use redis://host:6379/0, rediss:// for TLS or unix:///path (or empty)")
    return url


class CacheSettings(_Section):
    """The result cache, request-id store and in-flight locks (Redis, or process memory)."""

    redis_url: Annotated[str, AfterValidator(_redis_url)] = ""
    redis_timeout_ms: int = Field(default=250, ge=10)
    ttl_s: int = Field(default=86_400, ge=1, alias="cache_ttl_s")
    request_id_ttl_s: int = Field(default=7 * 86_400, ge=1)
    lock_ttl_s: float = Field(default=15.0, gt=0, alias="cache_lock_ttl_s")


class StorageSettings(_Section):
    """Object storage for the images: ``file://`` folder or ``s3://bucket/prefix``."""

    url: str = Field(default="./zimage-data", alias="storage_url")
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = Field(default=None, repr=False)
    image_format: Literal["png", "webp"] = "png"
    # Where erase_text may read s3:// sources: comma-separated s3:// prefixes in the
    # configured bucket (empty = the whole bucket).
    source_prefixes: str = ""


class EngineSettings(_Section):
    """Which model to load, where, and how; and how long a request may run in it."""

    model: str = DEFAULT_MODEL
    model_revision: str | None = None
    device: Device = "auto"
    dtype: DType = "bfloat16"
    attention_backend: AttentionBackend = "auto"
    # torch.compile of the transformer's repeated blocks ("regional"): faster steps on a
    # GPU (bench/gpu_latency.py), at the price of compiling during warm-up and per new shape.
    compile: CompileMode = "off"
    # Where compiled kernels are kept (Inductor's and Triton's caches), so a restarted
    # worker reuses them instead of compiling again; empty = a temporary folder.
    compile_cache_dir: Path | None = None
    # torch.compile of the VAE's decoder too (with ZIMAGE_COMPILE=regional).
    compile_vae: bool = False
    # "fp8": torchao float8 on the transformer's attention and feed-forward layers (CUDA,
    # compute capability 8.9+); elsewhere the model runs unquantized and /readyz says why.
    quantization: Literal["none", "fp8"] = "none"
    # Caption embeddings of this many recent prompts are kept on the device (0 = off):
    # a repeated prompt (style presets make many) skips the text encoder. Exact: each
    # prompt is encoded alone, so a cached embedding is the one a call would compute.
    prompt_cache_size: int = Field(default=256, ge=0, le=100_000)
    warmup: bool = True
    warmup_size: int = Field(default=256, ge=64, le=2048, multiple_of=16)
    # torch threads on a CPU device; 0 = all cores but one, which the event loop keeps.
    cpu_threads: int = Field(default=0, ge=0)
    # A request's budget when it names none (its ``timeout_s``), for both tasks.
    inference_timeout_s: float = Field(default=30.0, gt=0, le=300)
    # Local folder where `ZIMAGE_MODEL=tiny` builds the miniature pipeline.
    tiny_model_dir: Path = Path(".cache/zimage-tiny")
    # The engine runs in its own process, started this way ("forkserver" starts later
    # ones from a server that has torch imported already: faster restarts; both are safe
    # with CUDA, a plain fork is not).
    start_method: Literal["spawn", "forkserver"] = Field(
        default="spawn", alias="engine_start_method"
    )
    # A call that shows no progress (no denoising step) this long past its earliest
    # budget is taken as hung: the engine process is killed and started again.
    grace_s: float = Field(default=10.0, gt=0, le=600, alias="engine_grace_s")
    # An engine process that has not loaded the model this long after it started is
    # killed: at start the worker fails; on a restart it tries again, backing off.
    load_timeout_s: float = Field(default=900.0, ge=10, le=7200, alias="engine_load_timeout_s")
    # A request inside the engine when it (or the worker) died this many times is
    # dead-lettered and answered `poison_request`. At least 2: one death is no proof (a
    # neighbour's erase, the OOM killer taking the pod, or a record still running on its
    # old owner during a rebalance can look the same).
    poison_attempts: int = Field(default=2, ge=2, le=100)
    # Where those deaths are counted when there is no Redis (REDIS_URL empty): a local
    # file, so a restarted worker on the same machine or volume still sees them.
    attempts_file: Path = Path(".cache/zimage-attempts.json")


class BatchSettings(_Section):
    """How requests are grouped into pipeline calls, and how many may be in flight."""

    window_ms: int = Field(default=50, ge=0, le=60_000, alias="batch_window_ms")
    max_batch_size: int = Field(default=8, ge=1, le=64)
    max_in_flight: int = Field(default=64, ge=1)
    # Source pixels decoded at once for erase_text (a larger image waits to be alone):
    # decoded images and their working copies are what erasure holds in memory.
    erase_pixels_in_flight: int = Field(default=48_000_000, ge=1_000_000)


class OcrSettings(_Section):
    """Text detection for ``erase_text``: RapidOCR (models in the wheel) or EasyOCR
    (optional extra; its weights come from ``model_dir``, downloaded only if allowed)."""

    backend: Literal["rapidocr", "easyocr"] = Field(default="rapidocr", alias="ocr_backend")
    model_dir: Path | None = Field(default=None, alias="ocr_model_dir")
    allow_download: bool = Field(default=False, alias="ocr_allow_download")
    #: what runs RapidOCR's networks: OpenVINO where installed (``auto``), or onnxruntime
    runtime: Literal["auto", "openvino", "onnxruntime"] = Field(default="auto", alias="ocr_runtime")
    #: OpenVINO's precision for the detector: its choice (bfloat16 on CPUs with it
    #: natively), or float32 (the recogniser runs at float32 either way)
    precision: Literal["auto", "f32"] = Field(default="auto", alias="ocr_precision")


class Settings(BaseSettings):
    """All ``ZIMAGE_*`` settings, in sections (see README's settings table)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    SECTIONS: ClassVar[dict[str, type[_Section]]] = {
        "kafka": KafkaSettings,
        "cache": CacheSettings,
        "storage": StorageSettings,
        "engine": EngineSettings,
        "batch": BatchSettings,
        "ocr": OcrSettings,
    }

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    ocr: OcrSettings = Field(default_factory=OcrSettings)
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    # /metrics, /healthz and /readyz; -1 turns the endpoint off, 0 picks a free port.
    http_port: int = Field(default=8080, ge=-1, le=65535)

    @classmethod
    def flat_names(cls) -> set[str]:
        """Every setting's flat name (its variable is ``ZIMAGE_`` + the name in capitals)."""
        names = {n for n in cls.model_fields if n not in cls.SECTIONS}
        for section in cls.SECTIONS.values():
            names |= set(section.flat_names())
        return names

    @classmethod
    def variable_names(cls) -> set[str]:
        return {ENV_PREFIX + name.upper() for name in cls.flat_names()}

    def flat(self) -> dict[str, Any]:
        """Every setting by its flat name."""
        values = {n: getattr(self, n) for n in type(self).model_fields if n not in self.SECTIONS}
        for name in self.SECTIONS:
            values.update(getattr(self, name).flat())
        return values

    def environment(self) -> dict[str, str]:
        """The ``ZIMAGE_*`` variables that give a process these settings (unset ones left out)."""
        return {
            ENV_PREFIX + name.upper(): str(value).lower() if isinstance(value, bool) else str(value)
            for name, value in self.flat().items()
            if value is not None
        }

    def replace(self, **changes: Any) -> Settings:
        """A copy with some settings changed, by flat name; validated like the original."""
        unknown = set(changes) - self.flat_names()
        if unknown:
            raise ValueError(f"not settings: {sorted(unknown)}")
        return type(self)(_env_file=None, **{**self.flat(), **changes})  # type: ignore[call-arg]

    @model_validator(mode="before")
    @classmethod
    def _route_flat_names(cls, data: Any) -> Any:
        """Flat names (from the environment or keyword arguments) go into their sections."""
        if not isinstance(data, dict):
            return data
        routed = dict(data)
        for section, model in cls.SECTIONS.items():
            picked = {name: routed.pop(name) for name in model.flat_names() if name in routed}
            given = routed.get(section)
            if isinstance(given, BaseModel):
                given = given.model_dump(by_alias=True)
            if picked or given:
                routed[section] = {**picked, **(given or {})}
        return routed

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _FlatEnvironment(settings_cls)


class _FlatEnvironment(PydanticBaseSettingsSource):
    """``ZIMAGE_<FLAT NAME>`` variables (any case), by flat name."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads every name at once

    def __call__(self) -> dict[str, Any]:
        environ = {key.upper(): value for key, value in os.environ.items()}
        found = {}
        for name in Settings.flat_names():
            value = environ.get(ENV_PREFIX + name.upper())
            if value is not None:
                found[name] = value
        return found


class SettingsError(ValueError):
    """A setting that cannot be used; the message names its ``ZIMAGE_*`` variable."""


def explain(exc: ValidationError) -> SettingsError:
    """One line naming each wrong variable, its value and what it should be."""
    secret = ("password", "secret")
    parts = []
    for err in exc.errors(include_url=False):
        names = [p for p in err["loc"] if isinstance(p, str) and p not in Settings.SECTIONS]
        variable = ENV_PREFIX + names[-1].upper() if names else "settings"
        value = re.sub(r"//[^/@]*@", "//***@", str(err["input"]))  # a URL's credentials
        shown = "" if any(word in variable.lower() for word in secret) else f"={value}"
        if err["type"] == "extra_forbidden":
            shown = ""
        parts.append(f"{variable}{shown}: {err['msg']}")
    return SettingsError("; ".join(parts))


def unknown_variables(names: Iterable[str]) -> list[tuple[str, str | None]]:
    """The ``ZIMAGE_*`` names among ``names`` that are no setting, each with the nearest
    setting's variable (None when none is near): a misspelt name must not pass silently."""
    known = sorted(name.upper() for name in Settings.flat_names())
    unknown = []
    for name in names:
        flat = name.upper().removeprefix(ENV_PREFIX)
        if name.upper().startswith(ENV_PREFIX) and flat not in known:
            near = difflib.get_close_matches(flat, known, n=1, cutoff=0.6)
            unknown.append((name, ENV_PREFIX + near[0] if near else None))
    return sorted(unknown)
