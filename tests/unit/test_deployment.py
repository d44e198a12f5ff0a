"""compose.yaml, the Dockerfile and .env.example are valid and agree with the worker's
settings (this machine has no Docker engine to run them)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from compose_spec import PyCompose

from zimage_stream.settings import Settings

REPO = Path(__file__).resolve().parents[2]
SETTINGS = Settings.variable_names()
SETTINGS_DEFAULTS = Settings(_env_file=None)  # type: ignore[call-arg]
DEFAULTS = SETTINGS_DEFAULTS.kafka


def _compose() -> dict:
    """compose.yaml as Docker Compose reads it (YAML merge keys applied)."""
    return yaml.safe_load((REPO / "compose.yaml").read_text())


def _workers() -> dict[str, dict]:
    return {name: s for name, s in _compose()["services"].items() if name.startswith("worker")}


def test_compose_yaml_is_a_valid_compose_file_whose_references_resolve() -> None:
    compose = _compose()
    # The Compose Specification's rules (unknown keys, port and duration syntax...), as
    # the compose_spec parser applies them; it reads no merge keys, so it gets them applied.
    PyCompose.from_yaml(yaml.safe_dump(compose)).validate()
    services, volumes = compose["services"], set(compose["volumes"])
    for name, service in services.items():
        assert set(service.get("depends_on", {})) <= set(services), name
        named = {v.split(":")[0] for v in service.get("volumes", []) if not v.startswith(".")}
        assert named <= volumes, f"{name} mounts undeclared volumes {named - volumes}"


def test_every_image_is_pinned_and_minio_comes_from_quay() -> None:
    for name, service in _compose()["services"].items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest" and "/" not in tag, f"{name}: {image}"
        if "minio" in name:
            assert image.startswith("quay.io/minio/"), image


def test_compose_runs_kafka_redis_minio_topics_and_one_worker_per_gpu() -> None:
    services = _compose()["services"]
    assert {"kafka", "kafka-topics", "redis", "minio", "minio-bucket", "worker"} <= set(services)
    assert "KAFKA_PROCESS_ROLES" in services["kafka"]["environment"]  # KRaft, no ZooKeeper
    gpus = []
    for worker in _workers().values():
        (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and len(device["device_ids"]) == 1
        gpus += device["device_ids"]
        assert any(v.endswith(":/models") for v in worker["volumes"])
        assert worker["environment"]["HF_HOME"] == "/models"
        assert worker["environment"]["ZIMAGE_GROUP_ID"] == DEFAULTS.group_id
    assert len(gpus) == len(set(gpus)) >= 2, "each worker service has a GPU of its own"


def test_kafka_keeps_its_log_on_the_volume() -> None:
    kafka = _compose()["services"]["kafka"]
    log_dirs = kafka["environment"]["KAFKA_LOG_DIRS"]
    assert f"kafka-data:{log_dirs}" in kafka["volumes"]


def test_the_host_reaches_kafka_s3_and_the_worker_on_loopback_only() -> None:
    services = _compose()["services"]
    published = {
        f"{name}:{port.split(':')[-1]}": port
        for name, service in services.items()
        for port in service.get("ports", [])
    }
    assert all(p.startswith("127.0.0.1:") for p in published.values()), published
    # Kafka advertises the host a listener where the CLI looks by default.
    kafka = services["kafka"]["environment"]
    advertised = dict(
        entry.split("://") for entry in kafka["KAFKA_ADVERTISED_LISTENERS"].split(",")
    )
    assert advertised["EXTERNAL"] == DEFAULTS.bootstrap_servers == "localhost:9092"
    assert published["kafka:9092"] == "127.0.0.1:9092:9092"
    # ... and the containers another, the one the worker and the topics job use.
    for worker in _workers().values():
        assert worker["environment"]["ZIMAGE_KAFKA_BOOTSTRAP_SERVERS"] == advertised["INTERNAL"]
    assert f"--bootstrap-server {advertised['INTERNAL']}" in _topics_script()
    assert "minio:9000" in published  # the s3:// result objects
    assert f"worker:{SETTINGS_DEFAULTS.http_port}" in published  # /metrics, /readyz


def _topics_script() -> str:
    return _compose()["services"]["kafka-topics"]["command"][0]


def test_the_workers_environment_names_real_settings_that_agree_with_the_stack() -> None:
    services = _compose()["services"]
    environment = services["worker"]["environment"]
    names = {name for name in environment if name.startswith("ZIMAGE_")}
    assert names <= SETTINGS, f"not settings: {sorted(names - SETTINGS)}"
    # The topics the init job creates are the ones the worker reads and writes.
    script = _topics_script()
    created = set(re.search(r"for topic in ([^;]+);", script).group(1).split())  # type: ignore[union-attr]
    topics = {
        environment["ZIMAGE_REQUESTS_TOPIC"],
        environment["ZIMAGE_RESULTS_TOPIC"],
        environment["ZIMAGE_DLQ_TOPIC"],
    }
    defaults = {DEFAULTS.requests_topic, DEFAULTS.results_topic, DEFAULTS.dlq_topic}
    assert topics == defaults
    assert created == topics | {environment["ZIMAGE_PROGRESS_TOPIC"]}
    assert f"--partitions {DEFAULTS.topic_partitions}" in script
    assert environment["ZIMAGE_CREATE_TOPICS"] == "false"
    # Services are reached by their compose names.
    assert environment["ZIMAGE_REDIS_URL"].startswith("redis://redis:")
    assert environment["ZIMAGE_S3_ENDPOINT_URL"] == "http://minio:9000"
    bucket = re.search(r"local/(\S+)", services["minio-bucket"]["command"][0]).group(1)  # type: ignore[union-attr]
    storage_default = re.fullmatch(
        r"\$\{ZIMAGE_STORAGE_URL:-(.+)\}", environment["ZIMAGE_STORAGE_URL"]
    )
    assert storage_default and storage_default.group(1).startswith(f"s3://{bucket}/")
    # Kafka accepts the largest request the worker accepts.
    limit = int(services["kafka"]["environment"]["KAFKA_MESSAGE_MAX_BYTES"])
    assert limit >= DEFAULTS.max_message_bytes
    # The worker has time to finish its batch before Docker kills it.
    grace = float(services["worker"]["stop_grace_period"].rstrip("s"))
    assert grace > SETTINGS_DEFAULTS.shutdown_grace_s


def test_env_file_settings_are_not_overridden_by_the_compose_file() -> None:
    """A setting .env may hold is taken from it (``${NAME:-default}``), never fixed."""
    in_env_file = set(re.findall(r"^#?\s*(ZIMAGE_[A-Z0-9_]+)=", _env_example(), re.M))
    for worker in _workers().values():
        for name, value in worker["environment"].items():
            if name in in_env_file:
                assert str(value).startswith(f"${{{name}:-"), f"{name}: {value}"


def test_minio_has_no_default_secret() -> None:
    """The console and S3 API take the secret from .env; the stack refuses to start without."""
    minio = _compose()["services"]["minio"]["environment"]
    assert re.fullmatch(r"\$\{S3_SECRET_ACCESS_KEY:\?.+\}", minio["MINIO_ROOT_PASSWORD"])
    assert re.search(r"^S3_SECRET_ACCESS_KEY=$", _env_example(), re.M)


def test_compose_settings_parse() -> None:
    environment = _compose()["services"]["worker"]["environment"]
    values = {
        name.removeprefix("ZIMAGE_").lower(): re.sub(r"^\$\{\w+:-(.*)\}$", r"\1", str(value))
        for name, value in environment.items()
        if name.startswith("ZIMAGE_") and ":?" not in str(value)
    }
    settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]
    assert settings.storage.url == "s3://zimage/images" and settings.kafka.create_topics is False
    assert settings.engine.device == "cuda"
    # Apache Kafka answers fetches when records arrive: the default wait stays.
    assert settings.kafka.fetch_max_wait_ms == DEFAULTS.fetch_max_wait_ms


def _env_example() -> str:
    return (REPO / ".env.example").read_text()


def test_env_example_names_only_settings() -> None:
    names = set(re.findall(r"^#?\s*(ZIMAGE_[A-Z0-9_]+)=", _env_example(), re.M))
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
