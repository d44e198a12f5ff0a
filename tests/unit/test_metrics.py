"""The worker's Prometheus series: what each counts, and that the README's list is the
list the worker exposes."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.support.worker_state import FakeWorkerState
from zimage_stream.metrics import WorkerMetrics

README = Path(__file__).resolve().parents[2] / "README.md"


def _exposed(metrics: WorkerMetrics) -> dict[str, str]:
    """Family name (counters with ``_total``) -> type, as a scrape reads them."""
    families = text_string_to_metric_families(metrics.exposition().decode())
    return {
        (f.name + "_total" if f.type == "counter" else f.name): f.type
        for f in families
        if not f.name.endswith("_created")
    }


def _listed() -> dict[str, str]:
    """Series name -> type, from the README's table under "Metrics and health"."""
    section = README.read_text().split("## Metrics and health", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (`zimage_.+?) \| (\w+) \|", section, re.M)
    listed = {}
    for names, kind in rows:
        for name in re.findall(r"`(zimage_\w+)", names):
            listed[name] = kind
    return listed


def test_the_readme_lists_every_series_with_its_type() -> None:
    assert _listed() == _exposed(WorkerMetrics(FakeWorkerState()))


def test_device_busy_seconds_are_the_engines_own_clock() -> None:
    """The exposed busy time is what the engine process timed on the device (CUDA events
    on a GPU), not the worker's span of its calls."""
    state = FakeWorkerState(engine={"device_busy_ms": 2500})
    metrics = WorkerMetrics(state)
    metrics.record_batch(requests=2, seconds=1.5)
    metrics.record_erasure("diffusion", 0.5)
    metrics.record_erasure("classical", 4.0)  # a CPU thread beside the batches
    sample = metrics.registry.get_sample_value
    assert sample("zimage_device_busy_seconds_total") == 2.5
    assert 0 < sample("zimage_device_busy_fraction") <= 1
    assert sample("zimage_erase_seconds_count", {"engine": "classical"}) == 1
    state.engine["device_busy_ms"] = 4000
    assert sample("zimage_device_busy_seconds_total") == 4.0


def test_every_error_series_exists_at_zero_before_its_first_error() -> None:
    """So that ``increase()`` sees the first poison request or out-of-memory."""
    metrics = WorkerMetrics(FakeWorkerState())
    sample = metrics.registry.get_sample_value
    for code in ("poison_request", "out_of_memory", "timeout"):
        assert sample("zimage_request_errors_total", {"task": "generate", "code": code}) == 0
    metrics.record_result("generate", "failed", "poison_request", cache_hit=False, latency_s=1)
    poison = {"task": "generate", "code": "poison_request"}
    assert sample("zimage_request_errors_total", poison) == 1


def test_result_latency_is_kept_by_task_and_cache_hit_and_errors_by_code() -> None:
    metrics = WorkerMetrics(FakeWorkerState())
    metrics.record_result("generate", "succeeded", None, cache_hit=True, latency_s=0.02)
    metrics.record_result("generate", "timed_out", "timeout", cache_hit=False, latency_s=31)
    metrics.record_result(None, "rejected", "invalid_json", cache_hit=False, latency_s=-1)
    metrics.record_result("erase_text", "succeeded", None, cache_hit=False, latency_s=None)
    sample = metrics.registry.get_sample_value
    hit = {"task": "generate", "cache_hit": "true"}
    assert sample("zimage_result_latency_seconds_bucket", {**hit, "le": "0.025"}) == 1
    assert sample("zimage_result_latency_seconds_bucket", {**hit, "le": "0.01"}) == 0
    miss = {"task": "generate", "cache_hit": "false"}
    assert sample("zimage_result_latency_seconds_bucket", {**miss, "le": "30.0"}) == 0
    assert sample("zimage_result_latency_seconds_count", miss) == 1
    # A producer clock ahead of ours does not make a negative latency.
    unknown = {"task": "unknown", "cache_hit": "false"}
    assert sample("zimage_result_latency_seconds_sum", unknown) == 0
    assert sample("zimage_request_errors_total", {"task": "generate", "code": "timeout"}) == 1
    assert sample("zimage_request_errors_total", {"task": "unknown", "code": "invalid_json"}) == 1
    assert sample("zimage_requests_total", {"task": "generate", "status": "succeeded"}) == 1
    # A record without a timestamp is counted, but has no latency to observe.
    assert sample("zimage_requests_total", {"task": "erase_text", "status": "succeeded"}) == 1
    erase = {"task": "erase_text", "cache_hit": "false"}
    assert sample("zimage_result_latency_seconds_count", erase) is None


def test_dependency_failures_are_read_off_the_worker_at_scrape_time() -> None:
    state = FakeWorkerState(storage={"write": 3}, redis=2, is_degraded=True)
    sample = WorkerMetrics(state).registry.get_sample_value
    assert sample("zimage_redis_errors_total") == 2
    assert sample("zimage_storage_errors_total", {"operation": "write"}) == 3
    assert sample("zimage_storage_errors_total", {"operation": "read"}) == 0
    assert sample("zimage_degraded") == 1
