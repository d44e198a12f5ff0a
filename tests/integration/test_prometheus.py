"""A real Prometheus server scrapes a running worker and loads the alert rules; the rate
and histogram-quantile queries the dashboard is made of answer from the worker's series."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import KafkaIO, generate
from tests.support.monitoring import MONITORING, alert_rules, dashboard_queries
from zimage_stream.broker import LocalService, free_port
from zimage_stream.settings import Settings
from zimage_stream.testing import running_worker

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus is not installed (apt-get install prometheus)"
)


class PrometheusServer(LocalService):
    """``prometheus`` scraping one target every second, with the project's alert rules."""

    name = "prometheus"
    start_timeout_s = 60.0

    def __init__(self, folder: Path, target: str) -> None:
        self.folder, self.port = folder, free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(MONITORING / "alerts.yaml")],
            "scrape_configs": [
                {"job_name": "zimage-stream", "static_configs": [{"targets": [target]}]}
            ],
        }
        (folder / "prometheus.yaml").write_text(yaml.safe_dump(config))
        self._process: subprocess.Popen[bytes] | None = None

    def _launch(self) -> subprocess.Popen[bytes]:
        assert PROMETHEUS is not None
        with (self.folder / "prometheus.log").open("wb") as log:
            return subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={self.folder / 'prometheus.yaml'}",
                    f"--storage.tsdb.path={self.folder / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def _hint(self) -> str:
        return f" (its log: {self.folder / 'prometheus.log'})"

    def start(self) -> PrometheusServer:
        """Start, and wait until it is ready: it listens (and answers 503) before its
        storage has opened."""
        super().start()
        url = f"http://127.0.0.1:{self.port}/-/ready"
        for _ in range(int(self.start_timeout_s / 0.25)):
            # urllib's HTTPError (the 503) is an OSError
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return self
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"prometheus was not ready in {self.start_timeout_s:g} s{self._hint()}")

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{query}"
        with urllib.request.urlopen(url, timeout=10) as response:
            answer = json.loads(response.read())
        assert answer["status"] == "success", answer
        return answer["data"]

    def values(self, query: str) -> list[float]:
        return [float(item["value"][1]) for item in self.api("query", query=query)["result"]]


async def _until(server: PrometheusServer, query: str, timeout_s: float = 60) -> list[float]:
    """The query's values once it has any that are numbers (it fails after the timeout)."""
    for _ in range(int(timeout_s / 0.5)):
        values = await asyncio.to_thread(server.values, query)
        if values and not any(math.isnan(v) for v in values):
            return values
        await asyncio.sleep(0.5)
    raise AssertionError(f"no value for {query}")


async def test_prometheus_rates_and_quantiles_the_workers_series(
    settings: Settings, kafka_io: KafkaIO, tmp_path: Path
) -> None:
    settings = settings.replace(http_port=0)
    async with running_worker(settings) as worker:
        assert worker.http is not None
        server = PrometheusServer(tmp_path, f"127.0.0.1:{worker.http.port}").start()
        try:
            await _watch(server, kafka_io)
        finally:
            server.stop()


async def _watch(server: PrometheusServer, kafka_io: KafkaIO) -> None:
    """Requests in two waves, then the queries an operator's dashboard makes."""
    await _until(server, 'up{job="zimage-stream"} == 1')
    # Two waves with scrapes between them: a rate needs a counter that grew.
    for wave in range(2):
        for index in range(2):
            await kafka_io.send(generate(f"p-{wave}-{index}", f"a lamp {wave} {index}"))
        await kafka_io.send(generate(f"p-{wave}-repeat", "a lamp 0 0"))  # a cache hit
        await kafka_io.results(3 * (wave + 1))
        await asyncio.sleep(3)
    (rate,) = await _until(server, "sum(rate(zimage_requests_total[1m]))")
    assert rate > 0
    p99 = await _until(
        server,
        "histogram_quantile(0.99, sum by (le, cache_hit)"
        " (rate(zimage_result_latency_seconds_bucket[1m])))",
    )
    assert len(p99) == 2 and all(0 < seconds < 300 for seconds in p99)  # hit and miss
    (busy,) = await _until(server, "sum(rate(zimage_device_busy_seconds_total[1m]))")
    assert 0 < busy <= 1
    # Every dashboard query is one Prometheus accepts (status success), on these series.
    answered = [await asyncio.to_thread(server.api, "query", query=q) for q in dashboard_queries()]
    assert all(result["resultType"] == "vector" for result in answered)
    # The alert rules loaded, and evaluate without errors.
    groups = (await asyncio.to_thread(server.api, "rules"))["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == len(alert_rules())
    assert all(rule["health"] != "err" for rule in rules), rules
