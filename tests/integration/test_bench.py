"""The benchmark scripts run end to end on a tiny workload (figures are not asserted)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _env(tiny_model_dir: Path) -> dict[str, str]:
    """This environment without ZIMAGE_* settings, and the miniature model's folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZIMAGE_")}
    return {**env, "ZIMAGE_TINY_MODEL_DIR": str(tiny_model_dir)}


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_cache_latency_prints_its_table(tiny_model_dir: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(BENCH / "cache_latency.py"),
            "--requests",
            "12",
            "--warm",
            "3",
            "--repeat-share",
            "0.5",
            "--saturate",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(tiny_model_dir),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "cache hits" in out.stdout and "hit rate:" in out.stdout
    assert "device saturated: 2 requests" in out.stdout


@pytest.mark.skipif(
    not Path("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc").is_file(),
    reason="needs fonts-wqy-zenhei",
)
def test_erase_quality_prints_its_table() -> None:
    out = subprocess.run(
        [sys.executable, str(BENCH / "erase_quality.py"), "--images", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "erase accuracy (EA):" in out.stdout and "background" in out.stdout
    # The collateral's split by what was filled there adds up to the collateral.
    total = re.search(r"collateral \(changed.*?: ([0-9.]+)%", out.stdout)
    split = re.search(r"by what was filled there: (.*?) \(boxes:", out.stdout)
    assert total and split, out.stdout
    parts = [float(share) for share in re.findall(r"([0-9.]+)%", split.group(1))]
    assert parts and abs(sum(parts) - float(total.group(1))) <= 0.002 * len(parts)


@pytest.mark.skipif(
    not Path("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc").is_file(),
    reason="needs fonts-wqy-zenhei",
)
def test_erase_quality_with_cached_answers_gives_the_same_figures(tmp_path: Path) -> None:
    # --cache keeps the detector's and verifier's answers for mask and fill work: a second
    # run reads them and must measure exactly what the first did.
    command = [sys.executable, str(BENCH / "erase_quality.py"), "--images", "2"]
    runs = [
        subprocess.run(
            [*command, "--cache", str(tmp_path / "answers")],
            capture_output=True,
            text=True,
            timeout=300,
        )
        for _ in range(2)
    ]
    for out in runs:
        assert out.returncode == 0, out.stderr[-3000:]
        assert "answers cached in" in out.stdout
    assert any((tmp_path / "answers").glob("detect-*.pickle"))
    assert any((tmp_path / "answers").glob("verify-*.pickle"))

    def figures_of(stdout: str) -> list[str]:  # not times, nor log lines (timestamped)
        timed = ("seconds", "total", "[info")
        return [line for line in stdout.splitlines() if not any(t in line for t in timed)]

    figures = [figures_of(out.stdout) for out in runs]
    assert any("erase accuracy" in line for line in figures[0])
    assert figures[0] == figures[1]


def test_gpu_latency_runs_on_the_miniature_model() -> None:
    out = subprocess.run(
        [sys.executable, str(BENCH / "gpu_latency.py"), "--tiny", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| native | 1 |" in out.stdout and "| native | 4 |" in out.stdout


def test_throughput_compares_the_worker_with_the_naive_service(tiny_model_dir: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(BENCH / "throughput.py"), "--requests", "6", "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(tiny_model_dir),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "naive (one at a time)" in out.stdout and "throughput ratio" in out.stdout


def test_gpu_worker_bench_runs_its_sections_on_the_miniature_model(tiny_model_dir: Path) -> None:
    """The plumbing of the one-run GPU script (its figures need a GPU)."""
    out = subprocess.run(
        [
            sys.executable,
            str(BENCH / "gpu_worker.py"),
            *("--device", "cpu", "--model", "tiny", "--quick", "--no-compile"),
            *("--sections", "steps,fp8,worker"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(tiny_model_dir),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| eager, SDPA, no prompt cache |" in out.stdout
    assert "| + prompt cache |" in out.stdout
    assert "fp8 not measured: fp8 needs ZIMAGE_DTYPE=bfloat16" in out.stdout
    for workload in ("no repeats", "20 % repeats", "mixed sizes"):
        assert workload in out.stdout
    assert out.stdout.count("x |") == 3  # a ratio for each workload
