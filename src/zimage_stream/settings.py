"""Worker settings: read once from ``ZIMAGE_*`` variables at the edge (``cli.py``).

The library never reads the environment itself. ``Settings`` is the flat, frozen view
of the environment that ``../shared/CONTRACT.md`` names; the worker's parts take the
typed sub-settings that the ``kafka`` / ``engine`` / ``batch`` / ``storage`` properties
hand out, so each part sees only what it uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "Tongyi-MAI/Z-Image-Turbo"

Device = Literal["auto", "cuda", "mps", "cpu"]
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
DType = Literal["bfloat16", "float16", "float32"]
AttentionBackend = Literal["auto", "native", "flash", "_native_flash", "_flash_3"]
CompileMode = Literal["off", "regional"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


_S = TypeVar("_S", bound=_Frozen)


class KafkaSettings(_Frozen):
    """Where the worker reads requests and writes results."""

    bootstrap_servers: str = "localhost:9092"
    requests_topic: str = "zimage.requests"
    results_topic: str = "zimage.results"
    dlq_topic: str = "zimage.requests.dlq"
    progress_topic: str = ""
    group_id: str = "zimage-workers"
    client_id: str = "zimage-stream"
    max_message_bytes: int = 16 * 1024 * 1024
    session_timeout_ms: int = 30_000
    max_poll_interval_ms: int = 600_000
    fetch_max_wait_ms: int = 5
    create_topics: bool = True
    topic_partitions: int = 6
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism = "PLAIN"
    sasl_username: str | None = None
    sasl_password: str | None = Field(default=None, repr=False)
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None


class EngineSettings(_Frozen):
    """Which model to load, where, and how."""

    model: str = DEFAULT_MODEL
    model_revision: str | None = None
    device: Device = "auto"
    dtype: DType = "bfloat16"
    attention_backend: AttentionBackend = "auto"
    compile: CompileMode = "off"
    warmup: bool = True
    warmup_size: int = 256
    cpu_threads: int = 0
    inference_timeout_s: float = 30.0
    # Local folder where `ZIMAGE_MODEL=tiny` builds the miniature pipeline.
    tiny_model_dir: Path = Path(".cache/zimage-tiny")


class BatchSettings(_Frozen):
    """How requests are grouped into pipeline calls."""

    window_ms: int = 50
    max_batch_size: int = 8
    max_in_flight: int = 64


class StorageSettings(_Frozen):
    """Object storage for the images: ``file://`` folder or ``s3://bucket/prefix``."""

    url: str = "./zimage-data"
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    image_format: Literal["png", "webp"] = "png"


class Settings(BaseSettings):
    """All ``ZIMAGE_*`` settings (see README's settings table)."""

    model_config = SettingsConfigDict(env_prefix="ZIMAGE_", frozen=True, extra="ignore")

    kafka_bootstrap_servers: str = "localhost:9092"
    requests_topic: str = "zimage.requests"
    results_topic: str = "zimage.results"
    dlq_topic: str = "zimage.requests.dlq"
    # Step progress events, keyed by request_id (empty = none are sent).
    progress_topic: str = ""
    group_id: str = "zimage-workers"
    max_message_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    create_topics: bool = True
    topic_partitions: int = Field(default=6, ge=1)
    kafka_session_timeout_ms: int = Field(default=30_000, ge=1000)
    kafka_max_poll_interval_ms: int = Field(default=600_000, ge=1000)
    # How long the broker may hold a fetch open. Low, because a repeat is answered in
    # milliseconds: with the embedded Tansu broker a fetch was seen to wait out its full
    # time even when records arrived (p50 of cache hits 162 ms at aiokafka's 500 ms).
    kafka_fetch_max_wait_ms: int = Field(default=5, ge=0, le=10_000)
    # Kafka security: TLS (CA, and a client certificate for mutual TLS) and SASL.
    kafka_security_protocol: SecurityProtocol = "PLAINTEXT"
    kafka_sasl_mechanism: SaslMechanism = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = Field(default=None, repr=False)
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None

    redis_url: str = ""
    redis_timeout_ms: int = Field(default=250, ge=10)
    cache_ttl_s: int = Field(default=86_400, ge=1)
    request_id_ttl_s: int = Field(default=7 * 86_400, ge=1)
    cache_lock_ttl_s: float = Field(default=15.0, gt=0)

    storage_url: str = "./zimage-data"
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    image_format: Literal["png", "webp"] = "png"

    model: str = DEFAULT_MODEL
    model_revision: str | None = None
    device: Device = "auto"
    dtype: DType = "bfloat16"
    attention_backend: AttentionBackend = "auto"
    # torch.compile of the transformer's repeated blocks ("regional"): faster steps on a
    # GPU (bench/gpu_latency.py), at the price of compiling during warm-up and per new shape.
    compile: CompileMode = "off"
    warmup: bool = True
    # torch threads on a CPU device; 0 = all cores but one, which the event loop keeps.
    cpu_threads: int = Field(default=0, ge=0)
    tiny_model_dir: Path = Path(".cache/zimage-tiny")

    # Text detection for erase_text: RapidOCR (models in the wheel) or EasyOCR (optional
    # extra; its weights come from OCR_MODEL_DIR, downloaded only if OCR_ALLOW_DOWNLOAD).
    ocr_backend: Literal["rapidocr", "easyocr"] = "rapidocr"
    ocr_model_dir: Path | None = None
    ocr_allow_download: bool = False

    batch_window_ms: int = Field(default=50, ge=0, le=60_000)
    max_batch_size: int = Field(default=8, ge=1, le=64)
    max_in_flight: int = Field(default=64, ge=1)
    inference_timeout_s: float = Field(default=30.0, gt=0, le=300)
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    # /metrics, /healthz and /readyz; -1 turns the endpoint off, 0 picks a free port.
    http_port: int = Field(default=8080, ge=-1, le=65535)

    @property
    def kafka(self) -> KafkaSettings:
        return self._section(KafkaSettings, "kafka_")

    @property
    def engine(self) -> EngineSettings:
        return self._section(EngineSettings)

    @property
    def batch(self) -> BatchSettings:
        return self._section(BatchSettings, "batch_")

    @property
    def storage(self) -> StorageSettings:
        return self._section(StorageSettings, "storage_")

    def _section(self, cls: type[_S], prefix: str = "", **names: str) -> _S:
        """Build a sub-settings object from the flat fields with the same (or prefixed) name.

        A sub-settings field ``x`` takes ``names[x]``, else ``x``, else ``prefix + x``; fields
        with no flat counterpart keep their default.
        """
        flat = type(self).model_fields
        values = {}
        for field in cls.model_fields:
            for candidate in (names.get(field), field, prefix + field):
                if candidate is not None and candidate in flat:
                    values[field] = getattr(self, candidate)
                    break
        return cls(**values)
