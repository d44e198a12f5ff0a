"""The fast path: identical content is computed once, however many requests ask for it.

For every request, ``generate`` and ``erase_text`` alike, the worker asks
:meth:`Dedup.claim` with the request's id and content key, and gets one of three answers:

* **answered**: the result is already there (a cache hit whose objects still exist in
  storage, or the outcome of identical work this request waited for): publish it;
* **lead**: compute it, then :meth:`Dedup.settle` the key with the outcome, which
  remembers a success in the cache (before anyone is told, so a repeat is always a hit)
  and answers every request that waited for it;
* **abandoned**: the worker is stopping while this request waited: leave it
  uncommitted, and whoever owns its partition next reads it again.

Waiting happens on two levels. On this worker, identical requests that arrive while a
leader computes become its *followers*. Across workers, the leader takes the content's
Redis lock; a leader that finds the lock taken polls until the other worker's result
lands in the cache or its lock expires (its holder died), and then computes it itself.
This worker's locks are kept alive by a keeper task, a third of a lock TTL at a time.

Testable without Kafka: it needs only a :class:`~zimage_stream.cache.ResultCache` and a
:class:`~zimage_stream.storage.Storage`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Literal

import structlog

from .cache import CacheEntry, ResultCache
from .errors import ZImageError
from .storage import Storage

log = structlog.get_logger(__name__)

#: how often a request waiting for another worker looks for its result
POLL_S = 0.05


@dataclass(frozen=True)
class Answer:
    """How a content key was answered: a stored result, or the error that ended it."""

    entry: CacheEntry | None = None
    error: ZImageError | None = None


@dataclass(frozen=True)
class Claim:
    """What :meth:`Dedup.claim` decided for one request."""

    kind: Literal["answered", "lead", "abandoned"]
    answer: Answer | None = None


@dataclass
class DedupStats:
    """Counters for the metrics endpoint, the tests and the benchmarks."""

    hits: int = 0
    misses: int = 0
    stale: int = 0  # entries whose objects were gone from storage
    followers: int = 0  # requests that waited for identical work on this worker


class Dedup:
    """Cache lookups, in-flight followers and cross-worker locks for one worker."""

    def __init__(
        self, cache: ResultCache, storage: Storage, lock_ttl_s: float, owner: str | None = None
    ) -> None:
        self._cache = cache
        self._storage = storage
        self._lock_ttl_s = lock_ttl_s
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._followers: dict[str, list[tuple[str, asyncio.Future[Answer | None]]]] = {}
        self._budgets: dict[str, float | None] = {}  # the budget of each key's leader here
        self._locked: set[str] = set()  # content keys whose cache lock this worker holds
        self._closing = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None
        self.stats = DedupStats()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._keeper is None:
            self._closing.clear()
            self._keeper = asyncio.create_task(self._keep_locks(), name="lock-keeper")

    def close(self) -> None:
        """Stop waiting: requests waiting for another worker are abandoned from now on."""
        self._closing.set()

    async def stop(self) -> None:
        """Abandon whatever is still in flight (releasing its locks) and stop the keeper."""
        self.close()
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        for key in [*self._followers, *self._locked]:
            await self.abandon(key)

    async def __aenter__(self) -> Dedup:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- the protocol ----------------------------------------------------------------------

    async def claim(
        self, request_id: str, key: str, forced: bool = False, budget_s: float | None = None
    ) -> Claim:
        """Decide how ``request_id`` with content ``key`` is answered (see the module doc).

        ``forced`` (a forced replay) skips the cache but still joins identical work.
        ``budget_s`` is the request's time budget: a follower whose leader ran out of a
        smaller one does not share that timeout, it is computed with its own.
        """
        entry = None if forced else await self.lookup(request_id, key)
        if entry is not None:
            return Claim("answered", Answer(entry))
        if key in self._followers:
            leaders_s = self._budgets.get(key)
            answer = await self._follow(request_id, key)
            if _outlasts(budget_s, leaders_s, answer):
                return await self.claim(request_id, key, forced, budget_s)
            return Claim("abandoned") if answer is None else Claim("answered", answer)
        self._followers[key] = []
        self._budgets[key] = budget_s
        try:
            return await self._lead_or_wait(request_id, key, forced)
        except BaseException:
            # Nothing may stay claimed by a request that will never settle it: a stuck key
            # would keep its lock alive and its followers waiting for good.
            await self.abandon(key)
            raise

    async def _lead_or_wait(self, request_id: str, key: str, forced: bool) -> Claim:
        if not await self._cache.try_lock(key, self.owner, self._lock_ttl_s):
            return await self._wait_for_other_worker(request_id, key)
        self._locked.add(key)
        # The result may have landed between the lookup and the lock (another worker
        # finished just then): look once more before computing it again.
        landed = None if forced else await self._stored(key)
        if landed is not None:
            await self.settle(key, request_id, Answer(landed))
            return Claim("answered", Answer(landed))
        return await self._lead(key)

    async def _lead(self, key: str) -> Claim:
        """Lead ``key``, unless the worker began stopping meanwhile: then nothing new starts."""
        if self._closing.is_set():
            await self.abandon(key)
            return Claim("abandoned")
        return Claim("lead")

    async def settle(self, key: str, request_id: str, answer: Answer) -> None:
        """End ``key``: remember a success under the leader's and its followers' ids (while
        the key is still in flight, so an identical request that arrives meanwhile joins the
        followers instead of missing the cache), release the lock, tell the followers."""
        waiting = list(self._followers.get(key, []))
        if answer.entry is not None:
            ids = [request_id, *(rid for rid, _ in waiting)]
            await self._cache.remember(ids, answer.entry)
        followers = self._followers.pop(key, [])
        self._budgets.pop(key, None)
        if answer.entry is not None and (late := followers[len(waiting) :]):
            await self._cache.remember([rid for rid, _ in late], answer.entry)
        await self._unlock(key)
        for _, future in followers:
            if not future.done():
                future.set_result(answer)

    async def abandon(self, key: str) -> None:
        """Give ``key`` up unanswered (the worker stops before computing it): release its
        lock so no worker waits for it, and abandon its followers."""
        await self._unlock(key)
        self._budgets.pop(key, None)
        for _, future in self._followers.pop(key, []):
            if not future.done():
                future.set_result(None)

    async def lookup(self, request_id: str, key: str) -> CacheEntry | None:
        """The stored result of this request id, else of this content, whose objects all
        still exist in storage; None (a miss) otherwise. Counted as a hit or a miss."""
        entry = await self._cache.find(request_id, key)
        if entry is not None and not await self._objects_exist(entry):
            self.stats.stale += 1
            log.warning("cache_entry_objects_missing", content_key=key)
            entry = None
        if entry is None:
            self.stats.misses += 1
        else:
            self.stats.hits += 1
        return entry

    # -- waiting ---------------------------------------------------------------------------

    async def _follow(self, request_id: str, key: str) -> Answer | None:
        """The answer of the identical request leading ``key`` here (None: abandoned)."""
        self.stats.followers += 1
        future: asyncio.Future[Answer | None] = asyncio.get_running_loop().create_future()
        self._followers[key].append((request_id, future))
        return await future

    async def _wait_for_other_worker(self, request_id: str, key: str) -> Claim:
        """Another worker holds this content's lock: wait for its result, or take over."""
        log.info("waiting_for_other_worker", content_key=key)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), POLL_S)
            if self._closing.is_set():
                break
            entry = await self._stored(key)
            if entry is not None:
                await self.settle(key, request_id, Answer(entry))
                return Claim("answered", Answer(entry))
            if await self._cache.try_lock(key, self.owner, self._lock_ttl_s):  # holder gone
                log.info("took_over_content", content_key=key)
                self._locked.add(key)
                return await self._lead(key)
        await self.abandon(key)
        return Claim("abandoned")

    async def _stored(self, key: str) -> CacheEntry | None:
        entry = await self._cache.peek(key)
        return entry if entry is not None and await self._objects_exist(entry) else None

    async def _objects_exist(self, entry: CacheEntry) -> bool:
        async def exists(uri: str) -> bool:
            try:
                return await self._storage.exists(uri)
            except Exception:  # another storage's URI, or storage down: not usable here
                return False

        return all(await asyncio.gather(*(exists(image.uri) for image in entry.images)))

    # -- locks -----------------------------------------------------------------------------

    async def _unlock(self, key: str) -> None:
        if key in self._locked:
            self._locked.discard(key)
            await self._cache.unlock(key, self.owner)

    async def _keep_locks(self) -> None:
        """Extend the cache locks this worker holds, a third of a lock TTL at a time."""
        while True:
            await asyncio.sleep(self._lock_ttl_s / 3)
            for key in list(self._locked):
                await self._cache.extend_lock(key, self.owner, self._lock_ttl_s)


def _outlasts(budget_s: float | None, leaders_s: float | None, answer: Answer | None) -> bool:
    """Whether a follower with ``budget_s`` should compute again what its leader, with
    ``leaders_s``, ran out of time for."""
    timed_out = answer is not None and answer.error is not None and answer.error.code == "timeout"
    return timed_out and budget_s is not None and leaders_s is not None and budget_s > leaders_s
