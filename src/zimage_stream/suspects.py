"""Suspects and poison: a request that kills or hangs the engine cannot stop its partition.

Every record that goes into the engine is counted in before its call and counted out when
the call returns (whatever it answered). A count that is still there means the record
was inside the engine when the engine process, or the whole worker, died. The counts
live where the next owner of the partition sees them (``Attempts``): Redis when the
worker has one, else a local file; this worker also keeps them in memory, so a Redis
outage does not make it forget its own engine's deaths.

``Suspects.run`` calls the engine for a batch of records: a record with deaths behind it
runs alone (a batch of one), so one bad request cannot take its neighbours with it
twice; one with ``ZIMAGE_POISON_ATTEMPTS`` deaths is dead-lettered and answered
``poison_request`` without running; a record whose engine was killed for hanging after
its budget ran out is answered ``timeout``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import structlog
from redis.asyncio import Redis
from structlog.contextvars import bound_contextvars

from .consumer import Delivery
from .engine_process import EngineDied
from .errors import InferenceTimeoutError, PoisonRequestError, ZImageError

log = structlog.get_logger(__name__)

R = TypeVar("R")

#: how long a count is kept (a record not read again within a day is not coming back)
ATTEMPTS_TTL_S = 86_400


class AttemptStore(Protocol):
    async def get(self, keys: list[str]) -> list[int]: ...

    async def put(self, counts: dict[str, int]) -> None:
        """Set each key's count; a count of 0 forgets the key."""
        ...

    async def close(self) -> None: ...


class RedisAttempts:
    """Counts in Redis, shared by every worker of the group."""

    def __init__(self, url: str, timeout_s: float = 0.25) -> None:
        self._client: Redis = Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )

    async def get(self, keys: list[str]) -> list[int]:
        values = await self._client.mget([_redis_key(k) for k in keys])
        return [int(v) if v is not None else 0 for v in values]

    async def put(self, counts: dict[str, int]) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            for key, count in counts.items():
                if count:
                    pipe.set(_redis_key(key), count, ex=ATTEMPTS_TTL_S)
                else:
                    pipe.delete(_redis_key(key))
            await pipe.execute()

    async def close(self) -> None:
        await self._client.aclose()


class FileAttempts:
    """Counts in a small JSON file (written whole, atomically): for a worker without Redis,
    restarted on the same machine or volume."""

    def __init__(self, path: Path) -> None:
        self._path = path

    async def get(self, keys: list[str]) -> list[int]:
        counts = self._load()
        return [counts[key][0] if key in counts else 0 for key in keys]

    async def put(self, counts: dict[str, int]) -> None:
        stored, now = self._load(), time.time()
        for key, count in counts.items():
            if count:
                stored[key] = (count, now)
            else:
                stored.pop(key, None)
        for key in [k for k, (_, at) in stored.items() if now - at > ATTEMPTS_TTL_S]:
            del stored[key]
        self._path.parent.mkdir(parents=True, exist_ok=True)
        staging = self._path.with_name(f".{self._path.name}.{os.getpid()}")
        staging.write_text(json.dumps(stored))
        os.replace(staging, self._path)

    async def close(self) -> None:
        return None

    def _load(self) -> dict[str, tuple[int, float]]:
        """Read on every use: a worker restarted beside a live one shares the file."""
        try:
            raw = json.loads(self._path.read_text())
            return {str(k): (int(v[0]), float(v[1])) for k, v in raw.items()}
        except FileNotFoundError:
            return {}
        except (ValueError, TypeError, IndexError, AttributeError) as exc:
            log.warning("attempts_file_unreadable", path=str(self._path), error=repr(exc))
            return {}


class Attempts:
    """Deaths per record, kept in memory and mirrored to a store (best effort: a store
    that fails is logged, and the memory still counts this worker's own deaths)."""

    def __init__(self, store: AttemptStore, group_id: str) -> None:
        self._store = store
        self._group = group_id
        self._memory: dict[str, int] = {}

    def key(self, delivery: Delivery) -> str:
        topic, partition, offset = delivery.source
        return f"{self._group}:{topic}:{partition}:{offset}"

    async def deaths(self, keys: list[str]) -> list[int]:
        stored = await self._guarded(self._store.get(keys)) or [0] * len(keys)
        return [max(self._memory.get(k, 0), s) for k, s in zip(keys, stored, strict=True)]

    async def enter(self, keys: list[str]) -> list[int]:
        """Count the records in before their call; each one's count if the call dies."""
        counts = [d + 1 for d in await self.deaths(keys)]
        self._memory.update(zip(keys, counts, strict=True))
        await self._guarded(self._store.put(dict(zip(keys, counts, strict=True))))
        return counts

    async def leave(self, keys: list[str]) -> None:
        """The call returned: the records did not die in it."""
        await self.restore(keys, [0] * len(keys))

    async def restore(self, keys: list[str], counts: list[int]) -> None:
        """Put the counts back as they were before a call that did not die (it raised, or
        the worker stopped waiting for it)."""
        for key, count in zip(keys, counts, strict=True):
            if count:
                self._memory[key] = count
            else:
                self._memory.pop(key, None)
        await self._guarded(self._store.put(dict(zip(keys, counts, strict=True))))

    async def close(self) -> None:
        await self._store.close()

    async def _guarded(self, work: Awaitable[Any]) -> Any:
        try:
            return await work
        except Exception as exc:
            log.warning("attempts_store_failed", error=repr(exc))
            return None


DeadLetter = Callable[[Delivery, PoisonRequestError], Awaitable[None]]


@dataclass(eq=False)
class Suspects:
    """Runs engine calls for records so that none can stop the stream (see the module)."""

    attempts: Attempts
    limit: int
    dead_letter: DeadLetter

    async def run(
        self,
        deliveries: Sequence[Delivery],
        budgets_s: Sequence[float],
        call: Callable[[list[int], bool], Awaitable[list[R]]],
        contexts: Sequence[Mapping[str, Any]] = (),
    ) -> list[R | ZImageError]:
        """Each record's result from ``call(indices, alone)`` (one result per index, in
        order), or the error that answers it without one. ``alone`` asks the engine to run
        nothing else meanwhile: a suspect's call must die of itself or not at all.
        ``contexts`` are the records' log contexts (``request_id``...), when more than one
        record shares the call's: lines about one record carry its own."""
        keys = [self.attempts.key(d) for d in deliveries]
        contexts = contexts or [{} for _ in deliveries]
        results: list[R | ZImageError | None] = [None] * len(keys)
        innocents: list[int] = []
        queue: deque[list[int]] = deque()
        for index, deaths in enumerate(await self.attempts.deaths(keys)):
            if deaths >= self.limit:
                results[index] = await self._poison(deliveries[index], deaths, contexts[index])
            elif deaths:
                queue.append([index])  # a suspect runs alone
            else:
                innocents.append(index)
        if innocents:
            queue.appendleft(innocents)
        while queue:
            group = queue.popleft()
            group_keys = [keys[i] for i in group]
            counts = await self.attempts.enter(group_keys)
            try:
                answers = await call(group, group is not innocents)
            except EngineDied as died:
                log.warning(
                    "engine_died_with_requests",
                    requests=len(group),
                    request_ids=[contexts[i].get("request_id") for i in group],
                    reason=died.reason,
                )
                for index, count in zip(group, counts, strict=True):
                    if count >= self.limit:
                        results[index] = await self._poison(
                            deliveries[index], count, contexts[index]
                        )
                    elif died.reason == "hung" and died.elapsed_s >= budgets_s[index]:
                        results[index] = InferenceTimeoutError(
                            f"inference took longer than its {budgets_s[index]:g} s budget and "
                            "made no progress; the engine was stopped and started again"
                        )
                    else:
                        queue.append([index])  # a suspect now: run again, alone
                continue
            except BaseException:  # the call did not die with them: not a death
                before = [count - 1 for count in counts]
                await asyncio.shield(self.attempts.restore(group_keys, before))
                raise
            await self.attempts.leave(group_keys)
            for index, answer in zip(group, answers, strict=True):
                results[index] = answer
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    async def _poison(
        self, delivery: Delivery, deaths: int, context: Mapping[str, Any]
    ) -> PoisonRequestError:
        error = PoisonRequestError(
            f"the engine died with this request inside {deaths} times (the limit is "
            f"{self.limit}); it is dead-lettered and will not be run again",
            attempts=deaths,
        )
        with bound_contextvars(**context):
            log.error("poison_request", deaths=deaths, source=delivery.source)
            try:
                await self.dead_letter(delivery, error)
            except Exception as exc:
                log.error("poison_dead_letter_failed", error=repr(exc))
        return error


def attempt_store(redis_url: str, attempts_file: Path) -> AttemptStore:
    return RedisAttempts(redis_url) if redis_url else FileAttempts(attempts_file)


def _redis_key(key: str) -> str:
    return f"zimage:attempts:{key}"
