"""Deadlines and the out-of-memory ladder on the miniature model, with injected faults
(this machine has no GPU to run out of memory, so a hook raises what CUDA would)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from zimage_stream.engine import BatchShape, GenerateJob, ImageEngine, RunStats, run_batch
from zimage_stream.settings import EngineSettings

SHAPE = BatchShape(width=128, height=128, num_inference_steps=8, guidance_scale=0.0)
# Prompts of one caption-length bucket: an image is then the same whatever its batch.
JOBS = [GenerateJob(f"a red mug on a table {i}", 1, 10 + i) for i in range(4)]


@pytest.fixture
def engine(tiny_engine: ImageEngine, monkeypatch: pytest.MonkeyPatch) -> Iterator[ImageEngine]:
    frees: list[int] = []
    monkeypatch.setattr(tiny_engine, "free_memory", lambda: frees.append(1))
    tiny_engine.frees = frees  # type: ignore[attr-defined]
    yield tiny_engine
    tiny_engine.fault_hook = None


def _calls(engine: ImageEngine, fault: Any) -> list[int]:
    """Install ``fault(where, value)`` and return the sizes of the pipeline calls made."""
    sizes: list[int] = []

    def hook(where: str, value: int) -> None:
        if where == "call":
            sizes.append(value)
        fault(where, value)

    engine.fault_hook = hook
    return sizes


def test_out_of_memory_splits_the_batch_until_it_fits(engine: ImageEngine) -> None:
    def fault(where: str, images: int) -> None:
        if where == "call" and images > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    sizes = _calls(engine, fault)
    stats = RunStats()
    outcomes = run_batch(engine, JOBS, SHAPE, [30.0] * 4, stats)
    assert sizes == [4, 2, 2] and stats.oom_splits == 1
    assert all(o.error is None and o.images and len(o.images) == 1 for o in outcomes)
    assert engine.frees  # type: ignore[attr-defined]
    # Each job got its own picture: job 3 alone looks the same (to float32 rounding).
    engine.fault_hook = None
    (alone,) = run_batch(engine, JOBS[3:], SHAPE, [30.0])
    assert alone.images is not None and outcomes[3].images is not None
    difference = np.asarray(alone.images[0]).astype(int) - np.asarray(outcomes[3].images[0])
    assert np.abs(difference).max() <= 2, np.abs(difference).max()


def test_a_single_request_that_does_not_fit_is_answered_out_of_memory(
    engine: ImageEngine,
) -> None:
    def fault(where: str, images: int) -> None:
        if where == "call":
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    sizes = _calls(engine, fault)
    outcomes = run_batch(engine, JOBS[:3], SHAPE, [30.0] * 3)
    assert sizes == [3, 1, 2, 1, 1]  # halves, then halves of the halves, down to one
    for outcome in outcomes:
        assert outcome.images is None and outcome.error is not None
        assert (outcome.error.code, outcome.error.retriable) == ("out_of_memory", True)
        assert "even alone" in outcome.error.message


def test_a_call_stops_between_steps_at_the_earliest_deadline(engine: ImageEngine) -> None:
    step_s = 0.25
    steps: list[tuple[int, float]] = []  # (call number, time) of every finished step

    def fault(where: str, value: int) -> None:
        if where == "step":
            time.sleep(step_s)
            steps.append((len(sizes), time.monotonic()))

    sizes = _calls(engine, fault)
    started = time.monotonic()
    outcomes = run_batch(engine, JOBS[:2], SHAPE, [1.0, 30.0])
    # Job 0's second ran out after about 4 of 8 steps: the call stopped there, job 0 got
    # a timeout, and job 1 ran again alone, to the end.
    assert sizes == [2, 1]
    first_call = [t for call, t in steps if call == 1]
    assert len(first_call) < SHAPE.num_inference_steps
    assert first_call[-1] - started < 1.0 + step_s + 0.5  # overran by at most one step
    assert outcomes[0].error is not None and outcomes[0].images is None
    assert (outcomes[0].error.code, outcomes[0].error.status) == ("timeout", "timed_out")
    assert outcomes[1].error is None and outcomes[1].images is not None
    assert engine.frees  # type: ignore[attr-defined]


def test_requests_already_past_their_deadline_do_not_run(engine: ImageEngine) -> None:
    sizes = _calls(engine, lambda where, value: None)
    outcomes = run_batch(engine, JOBS[:2], SHAPE, [0.0, 30.0])
    assert sizes == [1]
    assert outcomes[0].error is not None and outcomes[0].error.code == "timeout"
    assert outcomes[1].images is not None


class _Pipe:
    """Records where the weights were sent; runs out of memory where told to."""

    def __init__(self, fails: set[str]) -> None:
        self.fails, self.moves = fails, []

    def to(self, device: str) -> None:
        self.moves.append(device)
        if "to:" + device in self.fails:
            raise torch.OutOfMemoryError(f"out of memory moving to {device} (injected)")

    def enable_model_cpu_offload(self, device: str) -> None:
        self.moves.append("offload:" + device)
        if "offload" in self.fails:
            raise torch.OutOfMemoryError("out of memory with offload (injected)")

    def remove_all_hooks(self) -> None:
        self.moves.append("unhooked")


@pytest.mark.parametrize(
    ("fails", "placement", "device"),
    [
        (set(), "device", "cuda"),
        ({"to:cuda"}, "model_cpu_offload", "cuda"),
        ({"to:cuda", "offload"}, "cpu", "cpu"),
    ],
)
def test_loading_falls_back_to_offload_then_cpu(
    fails: set[str], placement: str, device: str
) -> None:
    engine = ImageEngine(EngineSettings(model="tiny"))
    engine._device = "cuda"
    pipe = _Pipe(fails)
    assert engine._place(pipe) == placement
    assert engine._device == device
    if placement == "cpu":
        assert pipe.moves == ["cuda", "cpu", "offload:cuda", "unhooked", "cpu"]


def test_a_request_the_model_cannot_take_fails_alone(engine: ImageEngine) -> None:
    # The miniature text encoder has few positions: a long prompt breaks the whole call.
    culprit = GenerateJob("a mug with a very long description " * 30, 1, 5)
    sizes = _calls(engine, lambda where, value: None)
    stats = RunStats()
    outcomes = run_batch(engine, [JOBS[0], culprit, JOBS[1]], SHAPE, [60.0] * 3, stats)
    assert outcomes[1].images is None and outcomes[1].error is not None
    assert outcomes[1].error.code == "internal" and "inference failed" in outcomes[1].error.message
    for index, job in ((0, JOBS[0]), (2, JOBS[1])):  # the neighbours ran alone
        (solo,) = run_batch(engine, [job], SHAPE, [60.0])
        assert outcomes[index].error is None and outcomes[index].images is not None
        assert solo.images is not None
        assert np.array_equal(np.asarray(outcomes[index].images[0]), np.asarray(solo.images[0]))
    assert stats.isolations == 1 and sizes[:4] == [3, 1, 1, 1]
