"""Suspects and poison without Kafka or a model: an engine call that dies takes no
innocent request with it twice, a request inside the engine at too many deaths is
dead-lettered and answered ``poison_request``, and the deaths are remembered where the
next worker sees them (a file, or Redis)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import structlog
from structlog.contextvars import bound_contextvars, get_contextvars, merge_contextvars
from structlog.testing import capture_logs

from zimage_stream.consumer import Delivery
from zimage_stream.engine_process import EngineDied
from zimage_stream.errors import InferenceTimeoutError, PoisonRequestError, ZImageError
from zimage_stream.suspects import Attempts, FileAttempts, RedisAttempts, Suspects
from zimage_stream.testing import RedisServer

log = structlog.get_logger(__name__)


@dataclass
class _Record:
    source: tuple[str, int, int]


def _deliveries(count: int, first_offset: int = 0) -> list[Delivery]:
    return [cast(Delivery, _Record(("req", 0, first_offset + i))) for i in range(count)]


class _Engine:
    """Runs calls for named requests: a call with ``bad`` in it dies ``how``."""

    def __init__(self, names: list[str], bad: str, how: str = "crashed") -> None:
        self.names, self.bad, self.how = names, bad, how
        self.calls: list[list[str]] = []
        self.alone: list[bool] = []

    async def call(self, group: list[int], alone: bool) -> list[str]:
        names = [self.names[i] for i in group]
        self.calls.append(names)
        self.alone.append(alone)
        if self.bad in names:
            raise EngineDied(self.how, elapsed_s=5.0)
        return [f"image of {name}" for name in names]


def _suspects(attempts: Attempts, dead: list[tuple[Any, PoisonRequestError]]) -> Suspects:
    async def dead_letter(delivery: Delivery, error: PoisonRequestError) -> None:
        dead.append((delivery.source, error))

    return Suspects(attempts, limit=2, dead_letter=dead_letter)


async def test_a_request_that_kills_the_engine_is_poison_and_its_neighbours_succeed(
    tmp_path: Path,
) -> None:
    names = ["a", "b", "bad", "c"]
    engine, dead = _Engine(names, "bad"), []
    suspects = _suspects(Attempts(FileAttempts(tmp_path / "attempts.json"), "g"), dead)
    results = await suspects.run(_deliveries(4), [30.0] * 4, engine.call)
    assert results[:2] == ["image of a", "image of b"] and results[3] == "image of c"
    poison = results[2]
    assert isinstance(poison, PoisonRequestError) and poison.code == "poison_request"
    assert poison.attempts == 2 and not poison.retriable
    # The batch died once; then every request ran alone, the bad one dying a second time.
    assert engine.calls == [names, ["a"], ["b"], ["bad"], ["c"]]
    assert engine.alone == [False, True, True, True, True]  # nothing beside a suspect
    assert [(source, error.attempts) for source, error in dead] == [(("req", 0, 2), 2)]


async def test_deaths_survive_the_worker_and_the_next_one_poisons_without_running(
    tmp_path: Path,
) -> None:
    path = tmp_path / "attempts.json"
    names = ["a", "bad"]
    first = Attempts(FileAttempts(path), "g")
    # The worker died with both inside (its engine never answered): counted in, never out.
    await first.enter([first.key(d) for d in _deliveries(2)])
    # The next owner of the partition reads them again: both are suspects and run alone.
    engine, dead = _Engine(names, "bad", how="crashed"), []
    second = _suspects(Attempts(FileAttempts(path), "g"), dead)
    results = await second.run(_deliveries(2), [30.0, 30.0], engine.call)
    assert results[0] == "image of a" and isinstance(results[1], PoisonRequestError)
    assert engine.calls == [["a"], ["bad"]]
    # A third worker does not run it at all; the innocent one left no count behind.
    third_engine, third_dead = _Engine(names, "bad"), []
    third = _suspects(Attempts(FileAttempts(path), "g"), third_dead)
    results = await third.run(_deliveries(2), [30.0, 30.0], third_engine.call)
    assert isinstance(results[1], PoisonRequestError) and third_engine.calls == [["a"]]


async def test_a_hung_request_past_its_budget_times_out_and_the_others_run_again(
    tmp_path: Path,
) -> None:
    engine, dead = _Engine(["quick", "hangs", "patient"], "hangs", how="hung"), []
    suspects = _suspects(Attempts(FileAttempts(tmp_path / "a.json"), "g"), dead)
    # The call hung 5 s in: "hangs" had a 2 s budget, the others 60 s.
    results = await suspects.run(_deliveries(3), [60.0, 2.0, 60.0], engine.call)
    timed_out = results[1]
    assert isinstance(timed_out, InferenceTimeoutError) and timed_out.status == "timed_out"
    assert results[0] == "image of quick" and results[2] == "image of patient"
    assert not dead  # one death: answered timed_out, not poison


async def test_an_unreadable_attempts_file_counts_nothing(tmp_path: Path) -> None:
    path = tmp_path / "attempts.json"
    path.write_text("{not json")
    attempts = Attempts(FileAttempts(path), "g")
    keys = [attempts.key(d) for d in _deliveries(1)]
    assert await attempts.deaths(keys) == [0]
    assert await attempts.enter(keys) == [1]
    assert await Attempts(FileAttempts(path), "g").deaths(keys) == [1]


async def test_deaths_are_shared_through_redis_and_kept_in_memory_when_it_is_down(
    redis_server: RedisServer,
) -> None:
    first = Attempts(RedisAttempts(redis_server.url), "g")
    keys = [first.key(d) for d in _deliveries(3)]
    assert await first.enter(keys) == [1, 1, 1]
    await first.leave(keys[:2])
    other = Attempts(RedisAttempts(redis_server.url), "g")
    assert await other.deaths(keys) == [0, 0, 1]
    redis_server.stop()
    # Redis is gone: this worker still counts its own engine's deaths.
    assert await first.enter(keys[2:]) == [2]
    assert await first.deaths(keys[2:]) == [2]
    await first.close()
    await other.close()


def test_poison_is_a_failure_clients_must_not_retry() -> None:
    error: ZImageError = PoisonRequestError("x", attempts=2)
    assert error.to_dict() == {"code": "poison_request", "message": "x", "retriable": False}
    assert error.status == "failed"


async def test_a_call_that_fails_or_is_cancelled_counts_no_death(tmp_path: Path) -> None:
    """Only a death counts: an error answered by the engine, or a worker that stops
    waiting (shutdown), puts the counts back as they were."""
    attempts = Attempts(FileAttempts(tmp_path / "a.json"), "g")
    suspects = _suspects(attempts, [])
    deliveries = _deliveries(2)
    keys = [attempts.key(d) for d in deliveries]

    async def fails(group: list[int], alone: bool) -> list[str]:
        raise ValueError("the source could not be decoded")

    with pytest.raises(ValueError):
        await suspects.run(deliveries, [30.0, 30.0], fails)
    assert await attempts.deaths(keys) == [0, 0]

    started = asyncio.Event()

    async def never_returns(group: list[int], alone: bool) -> list[str]:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    for _ in range(3):  # three shutdowns in a row: still no death
        task = asyncio.create_task(suspects.run(deliveries, [30.0, 30.0], never_returns))
        await started.wait()
        started.clear()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert await attempts.deaths(keys) == [0, 0]
    assert await Attempts(FileAttempts(tmp_path / "a.json"), "g").deaths(keys) == [0, 0]


async def test_lines_about_a_poison_request_name_it_not_just_its_batch(tmp_path: Path) -> None:
    names = ["a", "bad", "c"]
    engine, seen = _Engine(names, "bad"), []

    async def dead_letter(delivery: Delivery, error: PoisonRequestError) -> None:
        seen.append(get_contextvars().get("request_id"))
        log.warning("dead_lettered", code=error.code)  # as the producer logs it

    suspects = Suspects(Attempts(FileAttempts(tmp_path / "a.json"), "g"), 2, dead_letter)
    contexts = [{"request_id": f"r-{name}", "task": "generate"} for name in names]
    with capture_logs(processors=[merge_contextvars]) as logs, bound_contextvars(batch_id="b1"):
        await suspects.run(_deliveries(3), [30.0] * 3, engine.call, contexts)
    assert seen == ["r-bad"]
    (poison,) = [e for e in logs if e["event"] == "poison_request"]
    (dead_lettered,) = [e for e in logs if e["event"] == "dead_lettered"]
    assert poison["request_id"] == dead_lettered["request_id"] == "r-bad"
    assert poison["batch_id"] == "b1"
    died = [e["request_ids"] for e in logs if e["event"] == "engine_died_with_requests"]
    assert died == [["r-a", "r-bad", "r-c"], ["r-bad"]]
