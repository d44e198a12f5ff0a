"""The cache's logic over the memory backend and over a backend that fails."""

from __future__ import annotations

import asyncio
import json

from structlog.testing import capture_logs

from zimage_stream.cache import CacheEntry, MemoryBackend, ResultCache, content_key
from zimage_stream.schemas import GenerateRequest, ImageRef, ModelInfo, parse_request

MODEL = ModelInfo(id="tiny", revision="local-1", device="cpu", dtype="float32")


def _request(request_id: str = "r1", **params: object) -> GenerateRequest:
    raw = {
        "schema_version": 1,
        "request_id": request_id,
        "task": "generate",
        "params": {"prompt": "a mug", **params},
    }
    request = parse_request(json.dumps(raw).encode(), 1 << 20)
    assert isinstance(request, GenerateRequest)
    return request


def _entry(key: str) -> CacheEntry:
    image = ImageRef(
        uri=f"file:///x/{key[:8]}.png",
        width=256,
        height=256,
        content_type="image/png",
        sha256=key,
        size_bytes=10,
    )
    return CacheEntry(content_key=key, images=[image], model=MODEL)


def test_content_key_depends_on_what_determines_the_output() -> None:
    base = content_key(_request(), MODEL)
    assert content_key(_request("other-id"), MODEL) == base  # the id does not matter
    assert content_key(_request(style="festive"), MODEL) != base
    assert content_key(_request(seed=5), MODEL) != base
    assert content_key(_request(width=512), MODEL) != base
    derived_seed = _request().params.resolved_seed()
    assert content_key(_request(seed=derived_seed), MODEL) == base  # same resolved seed
    other_model = MODEL.model_copy(update={"revision": "local-2"})
    assert content_key(_request(), other_model) != base


async def test_find_by_content_and_by_request_id() -> None:
    cache = ResultCache(MemoryBackend(), ttl_s=60, request_ttl_s=600)
    key = content_key(_request(), MODEL)
    assert await cache.find("r1", key) is None
    await cache.remember(["r1"], _entry(key))
    assert await cache.find("r2", key) == _entry(key)  # same content, new id
    other_key = content_key(_request(style="festive"), MODEL)
    with capture_logs() as logs:
        reused = await cache.find("r1", other_key)  # same id, other params
    assert reused == _entry(key)
    assert any(e["event"] == "request_id_reused_with_other_params" for e in logs)
    assert await cache.find("r3", other_key) is None


async def test_entries_expire() -> None:
    cache = ResultCache(MemoryBackend(), ttl_s=0.05, request_ttl_s=0.05)
    await cache.remember(["r1"], _entry("k"))
    assert await cache.peek("k") is not None
    await asyncio.sleep(0.06)
    assert await cache.peek("k") is None
    assert await cache.find("r1", "k") is None


async def test_lock_has_one_holder_until_released_or_expired() -> None:
    cache = ResultCache(MemoryBackend(), ttl_s=60, request_ttl_s=60)
    assert await cache.try_lock("k", "worker-a", ttl_s=60)
    assert not await cache.try_lock("k", "worker-b", ttl_s=60)
    await cache.unlock("k", "worker-b")  # not the holder: no effect
    assert not await cache.try_lock("k", "worker-b", ttl_s=60)
    await cache.unlock("k", "worker-a")
    assert await cache.try_lock("k", "worker-b", ttl_s=0.05)
    await asyncio.sleep(0.06)
    assert await cache.try_lock("k", "worker-c", ttl_s=60)  # the holder died: it expired


async def test_memory_backend_evicts_least_recently_used() -> None:
    backend = MemoryBackend(max_entries=2)
    await backend.set_many([("a", b"1"), ("b", b"2")], ttl_s=60)
    assert await backend.get_many(["a"]) == [b"1"]  # a is now the most recent
    await backend.set_many([("c", b"3")], ttl_s=60)
    assert await backend.get_many(["a", "b", "c"]) == [b"1", None, b"3"]


class _Broken(MemoryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.broken = True

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        self.calls += 1
        if self.broken:
            raise ConnectionError("redis is down")
        return await super().get_many(keys)

    async def set_if_absent(self, key: str, value: bytes, ttl_s: float) -> bool:
        self.calls += 1
        if self.broken:
            raise TimeoutError("redis is slow")
        return await super().set_if_absent(key, value, ttl_s)


async def test_a_failing_backend_is_stepped_around_and_retried() -> None:
    backend = _Broken()
    cache = ResultCache(backend, ttl_s=60, request_ttl_s=60, backoff_s=0.05)
    with capture_logs() as logs:
        assert await cache.find("r1", "k") is None  # a miss, not an exception
        assert await cache.try_lock("k", "me", ttl_s=5)  # granted locally
        assert await cache.find("r1", "k") is None
    assert backend.calls == 1  # the later calls did not wait on a dead backend
    assert cache.stats.errors == 1
    assert [e["event"] for e in logs] == ["cache_unavailable"]
    backend.broken = False
    await asyncio.sleep(0.06)
    with capture_logs() as logs:
        assert await cache.find("r1", "k") is None
    assert backend.calls == 2 and [e["event"] for e in logs] == ["cache_available_again"]


async def test_only_the_holder_extends_its_lock() -> None:
    cache = ResultCache(MemoryBackend(), ttl_s=60, request_ttl_s=60)
    assert await cache.try_lock("k", "worker-a", ttl_s=0.05)
    await cache.extend_lock("k", "worker-b", ttl_s=60)  # not the holder: ignored
    await cache.extend_lock("k", "worker-a", ttl_s=0.2)
    await asyncio.sleep(0.08)
    assert not await cache.try_lock("k", "worker-b", ttl_s=60)  # still held thanks to a
    await asyncio.sleep(0.15)
    assert await cache.try_lock("k", "worker-b", ttl_s=60)


def test_erase_key_depends_on_source_languages_engine_and_model() -> None:
    from zimage_stream.cache import erase_content_key

    base = erase_content_key("a" * 64, ["en", "ch"], "classical", MODEL)
    assert erase_content_key("a" * 64, ["ch", "en"], "classical", MODEL) == base
    assert erase_content_key("b" * 64, ["en", "ch"], "classical", MODEL) != base
    assert erase_content_key("a" * 64, ["en"], "classical", MODEL) != base
    assert erase_content_key("a" * 64, ["en", "ch"], "diffusion", MODEL) != base
    assert base != content_key(_request(), MODEL)


async def test_an_entry_that_no_longer_parses_is_a_miss_and_is_overwritten() -> None:
    backend = MemoryBackend()
    cache = ResultCache(backend, ttl_s=60, request_ttl_s=60)
    key = content_key(_request(), MODEL)
    layout_v0 = b'{"content_key": "k", "uris": ["file:///old.png"]}'
    await backend.set_many([("zimage:v1:res:" + key, layout_v0), ("zimage:v1:req:r1", b"\xff")], 60)
    with capture_logs() as logs:
        assert await cache.find("r1", key) is None
        assert await cache.peek(key) is None
    assert cache.stats.unreadable == 3
    assert {e["event"] for e in logs} == {"cache_entry_unreadable"}
    await cache.remember(["r1"], _entry(key))
    assert await cache.find("r1", key) == _entry(key) == await cache.peek(key)
