"""deploy/kubernetes: every object valid against the Kubernetes schemas (KEDA's
ScaledObject against its CRD's schema), and the manifests agree with each other and with
the worker's settings (this machine has no cluster to apply them to)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from zimage_stream.settings import Settings

REPO = Path(__file__).resolve().parents[2]
FOLDER = REPO / "deploy" / "kubernetes"
KEDA_SCHEMA = REPO / "tests" / "schemas" / "keda.sh_scaledobjects.v1alpha1.yaml"
#: the oldest Kubernetes still widely run, and the newest the package knows
VERSIONS = ["1.29.0", kubernetes_validate.utils.latest_version()]
DEFAULTS = Settings(_env_file=None)  # type: ignore[call-arg]


def _kustomization() -> dict[str, Any]:
    return yaml.safe_load((FOLDER / "kustomization.yaml").read_text())


def _objects() -> dict[str, dict[str, Any]]:
    """Every object the kustomization lists, by kind."""
    objects = {}
    for name in _kustomization()["resources"]:
        for document in yaml.safe_load_all((FOLDER / name).read_text()):
            objects[document["kind"]] = document
    return objects


def _container() -> dict[str, Any]:
    (container,) = _objects()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def _config() -> dict[str, str]:
    return _objects()["ConfigMap"]["data"]


def _settings() -> Settings:
    """The settings a pod gets from its ConfigMap and Secret."""
    environment = {**_config(), **_objects()["Secret"]["stringData"]}
    values = {
        name.removeprefix("ZIMAGE_").lower(): value
        for name, value in environment.items()
        if name.startswith("ZIMAGE_")
    }
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def _strict(schema: Any) -> Any:
    """A CRD's structural schema, with unknown fields refused: the API server would
    silently drop a misspelled one, which is worse."""
    if isinstance(schema, dict):
        strict = {key: _strict(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            strict["additionalProperties"] = False
        return strict
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


def test_the_kustomization_lists_every_manifest_in_the_folder() -> None:
    listed = set(_kustomization()["resources"])
    assert listed == {p.name for p in FOLDER.glob("*.yaml")} - {"kustomization.yaml"}


@pytest.mark.parametrize("version", VERSIONS)
def test_every_core_object_is_valid_for_kubernetes(version: str) -> None:
    for kind, document in _objects().items():
        if kind == "ScaledObject":
            continue
        kubernetes_validate.validate(document, version, strict=True)


def test_the_scaled_object_is_valid_against_kedas_crd_schema() -> None:
    schema = _strict(yaml.safe_load(KEDA_SCHEMA.read_text()))
    scaled = _objects()["ScaledObject"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    jsonschema.validate(scaled, schema)
    misspelt = {**scaled, "spec": {**scaled["spec"], "maxReplicas": 6}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(misspelt, schema)


def test_images_are_pinned() -> None:
    image = _container()["image"]
    assert ":" in image and not image.endswith(":latest")
    for override in _kustomization().get("images", []):
        assert override["newTag"] not in ("", "latest")


def test_the_configmap_and_secret_hold_settings_that_parse() -> None:
    names = {n for n in {**_config(), **_objects()["Secret"]["stringData"]} if n != "HF_HOME"}
    assert names <= Settings.variable_names(), sorted(names - Settings.variable_names())
    settings = _settings()
    assert settings.engine.device == "cuda" and settings.storage.url.startswith("s3://")
    assert settings.cache.redis_url.startswith("redis://")  # a fleet shares one Redis
    # Apache Kafka answers fetches when records arrive: the default wait stays.
    assert settings.kafka.fetch_max_wait_ms == DEFAULTS.kafka.fetch_max_wait_ms
    # Credentials are in the Secret only.
    assert not {n for n in _config() if "SECRET" in n or "PASSWORD" in n or "REDIS_URL" in n}


def test_the_deployment_runs_one_worker_per_gpu_with_settings_and_cache() -> None:
    container = _container()
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    sources = {next(iter(s.values()))["name"]: next(iter(s)) for s in container["envFrom"]}
    assert sources == {
        _objects()["ConfigMap"]["metadata"]["name"]: "configMapRef",
        _objects()["Secret"]["metadata"]["name"]: "secretRef",
    }
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == _config()["HF_HOME"]
    pod = _objects()["Deployment"]["spec"]["template"]["spec"]
    (volume,) = pod["volumes"]
    claim = _objects()["PersistentVolumeClaim"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # pods on several nodes


def test_probes_use_the_workers_endpoints_and_allow_the_model_load() -> None:
    container, settings = _container(), _settings()
    (port,) = container["ports"]
    assert port["containerPort"] == settings.http_port
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/readyz"
    # The pod is not killed while the model may still be loading.
    allowance = startup["periodSeconds"] * startup["failureThreshold"]
    assert allowance > settings.engine.load_timeout_s
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == port["name"]


def test_a_stopping_pod_has_time_to_finish_its_batch() -> None:
    pod = _objects()["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > _settings().shutdown_grace_s


def test_selectors_select_the_workers() -> None:
    objects = _objects()
    labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    selectors = [
        objects["Deployment"]["spec"]["selector"]["matchLabels"],
        objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
        objects["Service"]["spec"]["selector"],
    ]
    assert all(selector.items() <= labels.items() for selector in selectors)
    assert objects["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1


def test_keda_scales_on_the_workers_group_and_topic_up_to_the_partitions() -> None:
    scaled, settings = _objects()["ScaledObject"]["spec"], _settings()
    assert scaled["scaleTargetRef"]["name"] == _objects()["Deployment"]["metadata"]["name"]
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "kafka"
    lag = trigger["metadata"]
    assert lag["bootstrapServers"] == settings.kafka.bootstrap_servers
    assert lag["consumerGroup"] == settings.kafka.group_id == DEFAULTS.kafka.group_id
    assert lag["topic"] == settings.kafka.requests_topic == DEFAULTS.kafka.requests_topic
    assert lag["offsetResetPolicy"] == "earliest"  # as the worker's consumer reads
    # One worker at least (a loaded model answers at once); at most one per partition.
    assert scaled["minReplicaCount"] == 1
    assert scaled["maxReplicaCount"] == settings.kafka.topic_partitions
    assert settings.kafka.create_topics and lag["allowIdleConsumers"] == "false"
    # Down slowly: a long stabilisation window, one pod at a time.
    down = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 900
    assert down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 600}]


def test_the_lag_threshold_is_the_one_the_readme_derives() -> None:
    """lagThreshold = requests per second one GPU answers x the backlog, in seconds, an
    operator accepts: the README gives the figures and the result."""
    readme = (REPO / "README.md").read_text()
    deploy = readme[readme.index("## Deploy") :]
    found = re.search(
        r"lagThreshold = ([\d.]+) images/s / (\d+) images per request × (\d+) s = (\d+)", deploy
    )
    assert found, "the README's derivation of lagThreshold"
    images_per_s, per_request, backlog_s, threshold = found.groups()
    assert int(threshold) == math.floor(float(images_per_s) / int(per_request) * int(backlog_s))
    (trigger,) = _objects()["ScaledObject"]["spec"]["triggers"]
    assert trigger["metadata"]["lagThreshold"] == threshold
