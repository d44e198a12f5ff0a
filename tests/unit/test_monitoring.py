"""deploy/monitoring: the alert rules pass promtool's checks and unit tests, and every
query of the rules and the dashboard parses and names series the worker exposes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.monitoring import MONITORING, alert_rules, dashboard_queries
from tests.support.worker_state import FakeWorkerState
from zimage_stream.metrics import WorkerMetrics

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)"
)


def _promtool(*args: str, cwd: Path = MONITORING) -> str:
    assert PROMTOOL is not None
    done = subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _exposed_series() -> set[str]:
    """Every series name a worker's /metrics can carry (histogram parts included)."""
    metrics = WorkerMetrics(FakeWorkerState(lag={0: 3}))  # a worker that owns a partition
    metrics.record_erasure("classical", 1.0)  # labelled histograms show once observed
    metrics.record_result("generate", "failed", "timeout", cache_hit=False, latency_s=1)
    text = metrics.exposition().decode()
    return set(re.findall(r"^(zimage_\w+)(?:\{| )", text, re.M))


@needs_promtool
def test_the_alert_rules_pass_promtools_check() -> None:
    assert "SUCCESS" in _promtool("check", "rules", "alerts.yaml")


@needs_promtool
def test_the_alert_rules_pass_their_unit_tests() -> None:
    _promtool("test", "rules", "alerts.test.yaml")


@needs_promtool
def test_the_example_prometheus_config_is_valid() -> None:
    _promtool("check", "config", "prometheus.yaml")


@needs_promtool
def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    recorded = [
        {"record": f"dashboard:query_{index}", "expr": expr}
        for index, expr in enumerate(dashboard_queries())
    ]
    rules = tmp_path / "dashboard-rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recorded}]}))
    _promtool("check", "rules", str(rules))


def test_every_query_names_series_the_worker_exposes() -> None:
    exposed = _exposed_series()
    for query in dashboard_queries() + [rule["expr"] for rule in alert_rules()]:
        named = set(re.findall(r"\bzimage_\w+", query))
        assert named <= exposed, f"{query}: not exposed: {sorted(named - exposed)}"


def test_the_dashboard_shows_what_an_operator_watches() -> None:
    queries = "\n".join(dashboard_queries())
    for series in (
        "zimage_consumer_lag",
        "zimage_dlq_messages_total",
        "zimage_request_errors_total",
        "zimage_device_busy_seconds_total",
        "zimage_cache_hits_total",
        "zimage_result_latency_seconds_bucket",
        "zimage_engine_restarts_total",
        "zimage_redis_errors_total",
        "zimage_storage_errors_total",
    ):
        assert series in queries, series
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
