"""Worker settings: read once from ``ZIMAGE_*`` variables at the edge (``cli.py``).

The library never reads the environment itself. ``Settings`` is the flat, frozen view
of the environment that ``../shared/CONTRACT.md`` names; the worker's parts take the
typed sub-settings that the ``kafka`` / ``engine`` / ``batch`` / ``storage`` properties
hand out, so each part sees only what it uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "Tongyi-MAI/Z-Image-Turbo"

Device = Literal["auto", "cuda", "mps", "cpu"]
DType = Literal["bfloat16", "float16", "float32"]
AttentionBackend = Literal["auto", "native", "flash", "_native_flash", "_flash_3"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(_Frozen):
    """Where the worker reads requests and writes results."""

    bootstrap_servers: str = "localhost:9092"
    requests_topic: str = "zimage.requests"
    results_topic: str = "zimage.results"
    dlq_topic: str = "zimage.requests.dlq"
    group_id: str = "zimage-workers"
    client_id: str = "zimage-stream"
    max_message_bytes: int = 16 * 1024 * 1024
    session_timeout_ms: int = 30_000
    max_poll_interval_ms: int = 600_000
    create_topics: bool = True
    topic_partitions: int = 6


class EngineSettings(_Frozen):
    """Which model to load, where, and how."""

    model: str = DEFAULT_MODEL
    model_revision: str | None = None
    device: Device = "auto"
    dtype: DType = "bfloat16"
    attention_backend: AttentionBackend = "auto"
    warmup: bool = True
    warmup_size: int = 256
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
    group_id: str = "zimage-workers"
    max_message_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    create_topics: bool = True
    topic_partitions: int = Field(default=6, ge=1)
    kafka_session_timeout_ms: int = Field(default=30_000, ge=1000)
    kafka_max_poll_interval_ms: int = Field(default=600_000, ge=1000)

    redis_url: str = ""
    cache_ttl_s: int = Field(default=86_400, ge=1)

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
    warmup: bool = True
    tiny_model_dir: Path = Path(".cache/zimage-tiny")

    batch_window_ms: int = Field(default=50, ge=0, le=60_000)
    max_batch_size: int = Field(default=8, ge=1, le=64)
    max_in_flight: int = Field(default=64, ge=1)
    inference_timeout_s: float = Field(default=30.0, gt=0, le=300)
    shutdown_grace_s: float = Field(default=30.0, ge=0)

    @property
    def kafka(self) -> KafkaSettings:
        return KafkaSettings(
            bootstrap_servers=self.kafka_bootstrap_servers,
            requests_topic=self.requests_topic,
            results_topic=self.results_topic,
            dlq_topic=self.dlq_topic,
            group_id=self.group_id,
            max_message_bytes=self.max_message_bytes,
            create_topics=self.create_topics,
            topic_partitions=self.topic_partitions,
            session_timeout_ms=self.kafka_session_timeout_ms,
            max_poll_interval_ms=self.kafka_max_poll_interval_ms,
        )

    @property
    def engine(self) -> EngineSettings:
        return EngineSettings(
            model=self.model,
            model_revision=self.model_revision,
            device=self.device,
            dtype=self.dtype,
            attention_backend=self.attention_backend,
            warmup=self.warmup,
            inference_timeout_s=self.inference_timeout_s,
            tiny_model_dir=self.tiny_model_dir,
        )

    @property
    def batch(self) -> BatchSettings:
        return BatchSettings(
            window_ms=self.batch_window_ms,
            max_batch_size=self.max_batch_size,
            max_in_flight=self.max_in_flight,
        )

    @property
    def storage(self) -> StorageSettings:
        return StorageSettings(
            url=self.storage_url,
            s3_endpoint_url=self.s3_endpoint_url,
            s3_region=self.s3_region,
            s3_access_key_id=self.s3_access_key_id,
            s3_secret_access_key=self.s3_secret_access_key,
            image_format=self.image_format,
        )
