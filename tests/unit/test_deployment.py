"""compose.yaml, the Dockerfile and .env.example agree with the worker's settings (this
machine has no Docker engine to run them)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from zimage_stream.settings import Settings

REPO = Path(__file__).resolve().parents[2]
SETTINGS = Settings.variable_names()
DEFAULTS = Settings(_env_file=None).kafka  # type: ignore[call-arg]


def _compose() -> dict:
    return yaml.safe_load((REPO / "compose.yaml").read_text())


def test_compose_runs_kafka_redis_minio_topics_and_a_gpu_worker() -> None:
    services = _compose()["services"]
    assert {"kafka", "kafka-topics", "redis", "minio", "minio-bucket", "worker"} <= set(services)
    assert "KAFKA_PROCESS_ROLES" in services["kafka"]["environment"]  # KRaft, no ZooKeeper
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["count"] == 1
    assert any(v.endswith(":/models") for v in services["worker"]["volumes"])
    assert services["worker"]["environment"]["HF_HOME"] == "/models"


def test_the_workers_environment_names_real_settings_that_agree_with_the_stack() -> None:
    services = _compose()["services"]
    environment = services["worker"]["environment"]
    names = {name for name in environment if name.startswith("ZIMAGE_")}
    assert names <= SETTINGS, f"not settings: {sorted(names - SETTINGS)}"
    # The topics the init job creates are the ones the worker reads and writes.
    script = services["kafka-topics"]["command"][0]
    created = set(re.search(r"for topic in ([^;]+);", script).group(1).split())  # type: ignore[union-attr]
    topics = {
        environment["ZIMAGE_REQUESTS_TOPIC"],
        environment["ZIMAGE_RESULTS_TOPIC"],
        environment["ZIMAGE_DLQ_TOPIC"],
    }
    defaults = {DEFAULTS.requests_topic, DEFAULTS.results_topic, DEFAULTS.dlq_topic}
    assert created == topics == defaults
    assert f"--partitions {DEFAULTS.topic_partitions}" in script
    assert environment["ZIMAGE_CREATE_TOPICS"] == "false"
    # Services are reached by their compose names.
    assert environment["ZIMAGE_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert environment["ZIMAGE_REDIS_URL"].startswith("redis://redis:")
    assert environment["ZIMAGE_S3_ENDPOINT_URL"] == "http://minio:9000"
    bucket = re.search(r"local/(\S+)", services["minio-bucket"]["command"][0]).group(1)  # type: ignore[union-attr]
    assert environment["ZIMAGE_STORAGE_URL"].startswith(f"s3://{bucket}/")
    # Kafka accepts the largest request the worker accepts.
    limit = int(services["kafka"]["environment"]["KAFKA_MESSAGE_MAX_BYTES"])
    assert limit >= DEFAULTS.max_message_bytes
    # The worker has time to finish its batch before Docker kills it.
    grace = float(services["worker"]["stop_grace_period"].rstrip("s"))
    assert grace > Settings(_env_file=None).shutdown_grace_s  # type: ignore[call-arg]


def test_compose_settings_parse() -> None:
    environment = _compose()["services"]["worker"]["environment"]
    values = {
        name.removeprefix("ZIMAGE_").lower(): value
        for name, value in environment.items()
        if name.startswith("ZIMAGE_") and "${" not in str(value)
    }
    settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]
    assert settings.storage.url == "s3://zimage/images" and settings.kafka.create_topics is False


def test_env_example_names_only_settings() -> None:
    text = (REPO / ".env.example").read_text()
    names = set(re.findall(r"^#?\s*(ZIMAGE_[A-Z0-9_]+)=", text, re.M))
    assert names and names <= SETTINGS, f"not settings: {sorted(names - SETTINGS)}"


def test_the_image_runs_the_worker() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert 'CMD ["zimage-stream", "worker"]' in dockerfile
    assert "STOPSIGNAL SIGTERM" in dockerfile


def test_the_readme_lists_every_setting() -> None:
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## Settings") : readme.index("## Replay")]
    listed = {"ZIMAGE_" + name for name in re.findall(r"`([A-Z0-9_]+)`", table)}
    assert listed >= SETTINGS, f"not in the README's table: {sorted(SETTINGS - listed)}"
