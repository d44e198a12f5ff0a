"""The fast path on its own: cache lookups, followers, cross-worker locks, settling.

Every test runs over the in-process memory cache and over a real redis-server (skipped
where none is installed); no Kafka is involved.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from zimage_stream.cache import CacheEntry, MemoryBackend, RedisBackend, ResultCache
from zimage_stream.dedup import Answer, Dedup
from zimage_stream.errors import InferenceTimeoutError
from zimage_stream.schemas import ImageRef, ModelInfo
from zimage_stream.settings import StorageSettings
from zimage_stream.storage import Storage

MODEL = ModelInfo(id="tiny", revision="local-1", device="cpu", dtype="float32")
LOCK_TTL_S = 0.4


@pytest.fixture(params=["memory", "redis"])
async def cache(request: pytest.FixtureRequest) -> AsyncIterator[ResultCache]:
    if request.param == "memory":
        backend: MemoryBackend | RedisBackend = MemoryBackend()
    else:
        backend = RedisBackend(request.getfixturevalue("redis_server").url)
    async with ResultCache(backend, 60, 600) as opened:
        yield opened


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return Storage.from_settings(StorageSettings(url=str(tmp_path / "images")))


async def _stored_entry(storage: Storage, key: str) -> CacheEntry:
    stored = await storage.put_image(f"image of {key}".encode(), "png")
    image = ImageRef(
        uri=stored.uri,
        width=16,
        height=16,
        content_type="image/png",
        sha256=stored.sha256,
        size_bytes=stored.size_bytes,
    )
    return CacheEntry(content_key=key, images=[image], model=MODEL)


StartWorker = Callable[[str], Awaitable[Dedup]]


@pytest.fixture
async def worker(cache: ResultCache, storage: Storage) -> AsyncIterator[StartWorker]:
    """Starts one worker's fast path per call (by owner name); all are stopped at the end."""
    started: list[Dedup] = []

    async def start(owner: str) -> Dedup:
        dedup = Dedup(cache, storage, LOCK_TTL_S, owner=owner)
        await dedup.start()
        started.append(dedup)
        return dedup

    yield start
    for dedup in started:
        await dedup.stop()


async def test_a_stored_result_is_a_hit_and_a_missing_object_a_miss(
    cache: ResultCache, storage: Storage, worker: StartWorker
) -> None:
    dedup = await worker("w1")
    entry = await _stored_entry(storage, "k1")
    await cache.remember(["first"], entry)
    claim = await dedup.claim("second", "k1")
    assert claim.kind == "answered" and claim.answer == Answer(entry)
    # An entry whose image is gone from storage is stale: computed again.
    gone = entry.model_copy(update={"content_key": "k2"})
    gone.images[0] = gone.images[0].model_copy(update={"uri": entry.images[0].uri + ".gone"})
    await cache.remember(["third"], gone)
    assert (await dedup.claim("fourth", "k2")).kind == "lead"
    assert (dedup.stats.hits, dedup.stats.misses, dedup.stats.stale) == (1, 1, 1)


async def test_a_forced_replay_skips_the_cache(
    cache: ResultCache, storage: Storage, worker: StartWorker
) -> None:
    dedup = await worker("w1")
    await cache.remember(["first"], await _stored_entry(storage, "k1"))
    assert (await dedup.claim("again", "k1", forced=True)).kind == "lead"


async def test_identical_requests_follow_the_leader_and_are_remembered(
    cache: ResultCache, storage: Storage, worker: StartWorker
) -> None:
    dedup = await worker("w1")
    assert (await dedup.claim("leader", "k1")).kind == "lead"
    followers = [asyncio.create_task(dedup.claim(f"f{i}", "k1")) for i in range(2)]
    await asyncio.sleep(0.05)
    assert not any(f.done() for f in followers) and dedup.stats.followers == 2
    entry = await _stored_entry(storage, "k1")
    await dedup.settle("k1", "leader", Answer(entry))
    for follower in followers:
        claim = await follower
        assert claim.kind == "answered" and claim.answer == Answer(entry)
    # Each follower's id is remembered: a repeat of it is answered from the store.
    for request_id in ("leader", "f0", "f1"):
        assert await cache.find(request_id, "other-content") == entry


async def test_followers_share_the_leaders_error_and_nothing_is_remembered(
    cache: ResultCache, storage: Storage, worker: StartWorker
) -> None:
    dedup = await worker("w1")
    assert (await dedup.claim("leader", "k1")).kind == "lead"
    follower = asyncio.create_task(dedup.claim("f", "k1"))
    await asyncio.sleep(0.02)
    failed = InferenceTimeoutError("too slow")
    await dedup.settle("k1", "leader", Answer(error=failed))
    claim = await follower
    assert claim.kind == "answered" and claim.answer is not None
    assert claim.answer.error is failed and claim.answer.entry is None
    assert await cache.find("f", "k1") is None
    # The key is free again: the next identical request computes it.
    assert (await dedup.claim("retry", "k1")).kind == "lead"


async def _two_workers_a_leading(worker: StartWorker) -> tuple[Dedup, Dedup]:
    """Workers ``a`` and ``b``; ``a`` leads content ``k1`` (request ``ra``)."""
    a, b = await worker("a"), await worker("b")
    assert (await a.claim("ra", "k1")).kind == "lead"
    return a, b


async def test_another_worker_waits_for_the_holder_and_then_hits(
    cache: ResultCache, storage: Storage, worker: StartWorker
) -> None:
    a, b = await _two_workers_a_leading(worker)
    waiting = asyncio.create_task(b.claim("rb", "k1"))
    await asyncio.sleep(LOCK_TTL_S * 2.5)  # a's keeper extends its lock meanwhile
    assert not waiting.done()
    entry = await _stored_entry(storage, "k1")
    await a.settle("k1", "ra", Answer(entry))
    claim = await asyncio.wait_for(waiting, 5)
    assert claim.kind == "answered" and claim.answer == Answer(entry)
    assert await cache.find("rb", "unrelated") == entry  # b remembered its own id


async def test_a_dead_holders_work_is_taken_over(
    cache: ResultCache, storage: Storage, worker: StartWorker
) -> None:
    dead = Dedup(cache, storage, LOCK_TTL_S, owner="dead")  # never started: no keeper
    assert (await dead.claim("ra", "k1")).kind == "lead"
    b = await worker("b")
    claim = await asyncio.wait_for(b.claim("rb", "k1"), LOCK_TTL_S * 5)
    assert claim.kind == "lead"  # the lock expired with its holder


async def test_stopping_abandons_waiters_and_releases_locks(
    cache: ResultCache, storage: Storage, worker: StartWorker
) -> None:
    a, b = await _two_workers_a_leading(worker)
    local = asyncio.create_task(a.claim("ra2", "k1"))
    remote = asyncio.create_task(b.claim("rb", "k1"))
    await asyncio.sleep(0.1)
    b.close()
    assert (await asyncio.wait_for(remote, 2)).kind == "abandoned"
    await a.stop()  # a never computed k1: its follower is abandoned, its lock released
    assert (await asyncio.wait_for(local, 2)).kind == "abandoned"
    c = await worker("c")
    assert (await c.claim("rc", "k1")).kind == "lead"  # no one holds k1 any more


async def test_nothing_new_is_led_once_the_worker_stops(
    cache: ResultCache, storage: Storage, worker: StartWorker
) -> None:
    dedup = await worker("w1")
    dedup.close()
    # Claimed while stopping: not computed, and the lock is not left behind.
    assert (await dedup.claim("late", "k1")).kind == "abandoned"
    other = await worker("w2")
    assert (await asyncio.wait_for(other.claim("other", "k1"), 2)).kind == "lead"


async def test_a_failing_claim_leaves_nothing_claimed(
    cache: ResultCache, storage: Storage, worker: StartWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    dedup = await worker("w1")

    async def corrupt(key: str) -> None:
        raise ValueError("a stored result that no longer parses")

    monkeypatch.setattr(cache, "peek", corrupt)
    with pytest.raises(ValueError, match="no longer parses"):
        await dedup.claim("r1", "k1")
    monkeypatch.undo()
    # The key and its lock are free: the same worker and another can lead it again.
    other = await worker("w2")
    assert (await asyncio.wait_for(other.claim("r2", "k1"), 2)).kind == "lead"


async def test_a_follower_with_more_time_does_not_share_its_leaders_timeout(
    cache: ResultCache, storage: Storage, worker: StartWorker
) -> None:
    dedup = await worker("w1")
    assert (await dedup.claim("quick", "k1", budget_s=1)).kind == "lead"
    patient = asyncio.create_task(dedup.claim("patient", "k1", budget_s=300))
    hasty = asyncio.create_task(dedup.claim("hasty", "k1", budget_s=1))
    await asyncio.sleep(0.05)
    timed_out = InferenceTimeoutError("inference took longer than its 1 s budget")
    await dedup.settle("k1", "quick", Answer(error=timed_out))
    # The one with the same budget shares the timeout; the patient one computes it itself.
    hasty_claim = await asyncio.wait_for(hasty, 2)
    assert hasty_claim.answer is not None and hasty_claim.answer.error is timed_out
    assert (await asyncio.wait_for(patient, 2)).kind == "lead"
