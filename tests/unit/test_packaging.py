"""The base install is the client library and the contract: an upstream service that
publishes requests and reads results installs neither torch nor the worker's stack."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from zimage_stream.cli import WORKER_MODULES

REPO = Path(__file__).resolve().parents[2]
#: import names of the ``worker`` extra's packages
WORKER_STACK = {
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "redis",
    "obstore",
    "PIL",
    "numpy",
    "tqdm",
    "prometheus_client",
    "cv2",
    "onnxruntime",
    "rapidocr_onnxruntime",
    "openvino",
}
CLIENT_MODULES = ["client", "schemas", "settings", "errors", "asyncapi", "topics", "cli"]


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_the_client_and_the_contract_import_nothing_of_the_worker_stack() -> None:
    imports = "; ".join(f"import zimage_stream.{name}" for name in CLIENT_MODULES)
    out = _run(
        f"import sys; {imports}\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(WORKER_STACK)!r})))"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_client_works_where_the_worker_stack_is_not_installed() -> None:
    """With every worker package unimportable, the client, submit's options and the schema
    still work, and ``worker`` says how to get what it needs."""
    block = "".join(f"sys.modules[{name!r}] = None\n" for name in sorted(WORKER_STACK))
    out = _run(
        f"import sys\n{block}"
        "from zimage_stream.client import ZImageClient, generate_request\n"
        "ZImageClient('localhost:1', security_protocol='SASL_SSL', sasl_username='u')\n"
        "from zimage_stream.cli import main\n"
        "assert main(['schema']) == 0\n"
        "sys.exit(main(['worker']))\n"
    )
    assert out.returncode == 2, out.stderr
    assert "pip install 'zimage-stream[worker]'" in out.stderr
    assert "Traceback" not in out.stderr


def test_the_base_dependencies_are_the_clients_and_dev_brings_the_worker() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = {_name(d) for d in project["dependencies"]}
    assert base == {"aiokafka", "pydantic", "pydantic-settings", "structlog"}
    extras = project["optional-dependencies"]
    worker = {_name(d) for d in extras["worker"]}
    assert {"torch", "diffusers", "redis", "obstore", "pillow"} <= worker
    assert "zimage-stream[worker]" in extras["easyocr"]
    assert any(d.startswith("zimage-stream[") and "worker" in d for d in extras["dev"])


def _name(requirement: str) -> str:
    for stop in "[<>=!~ ;":
        requirement = requirement.split(stop)[0]
    return requirement.strip()


def test_the_missing_dependency_check_covers_every_package_of_the_worker_extra() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    modules_of: dict[str, set[str]] = {}
    for module, distributions in packages_distributions().items():
        for distribution in distributions:
            modules_of.setdefault(_normal(distribution), set()).add(module)
    for requirement in project["optional-dependencies"]["worker"]:
        distribution = _normal(_name(requirement))
        assert modules_of[distribution] & set(WORKER_MODULES), distribution


def _normal(distribution: str) -> str:
    return distribution.lower().replace("_", "-")
