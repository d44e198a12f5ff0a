"""The result cache, request-id store and in-flight locks, over Redis or memory (the
protocol that uses them is ``dedup``'s), and the content keys they are kept under.

Three kinds of keys live under one namespace:

* ``res:<content key>``: a succeeded result's images and model, for the cache TTL;
* ``req:<request id>``: the same for a request id that succeeded (idempotency), so a
  repeated id is answered from the store even when its params changed;
* ``lock:<content key>``: held by the worker computing that content, so identical
  requests on other workers wait for its result instead of computing it again. The
  holder extends it while it works; a holder that dies loses it within one lock TTL.

Redis is optional (``ZIMAGE_REDIS_URL`` empty = process memory). When Redis fails or is
slow the cache steps aside for a short back-off: lookups are misses, writes are skipped,
locks are granted locally. The worker keeps serving; redis-py reconnects on the next call.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from pydantic import BaseModel
from redis.asyncio import Redis
from redis.exceptions import RedisError

from .schemas import GenerateRequest, ImageRef, ModelInfo, TextRegion
from .settings import CacheSettings
from .styles import style_prompt

log = structlog.get_logger(__name__)


class CacheEntry(BaseModel):
    """What a cache hit answers with."""

    content_key: str
    images: list[ImageRef]
    text_regions: list[TextRegion] = []
    model: ModelInfo


def content_key(request: GenerateRequest, model: ModelInfo) -> str:
    """A digest of everything that determines a request's output (not its id or timing)."""
    params = request.params
    canonical = {
        "task": request.task,
        "prompt": style_prompt(params.prompt, params.style),
        "width": params.width,
        "height": params.height,
        "num_images": params.num_images,
        "seed": params.resolved_seed(),
        "steps": params.num_inference_steps,
        "guidance": params.guidance_scale,
        "model": model.id,
        "revision": model.revision,
        "dtype": model.dtype,
    }
    return _digest(canonical)


def erase_content_key(
    source_sha256: str, languages: list[str], engine: str, model: ModelInfo
) -> str:
    """The same for ``erase_text``: the source's bytes, languages, engine and model."""
    canonical = {
        "task": "erase_text",
        # 2: languages reach the detector. Results erased before ignored them; a new key
        # keeps a shared cache from answering with those.
        "eraser": 2,
        "source_sha256": source_sha256,
        "languages": sorted(languages),
        "engine": engine,
        "model": model.id,
        "revision": model.revision,
        "dtype": model.dtype,
    }
    return _digest(canonical)


def _digest(canonical: Mapping[str, object]) -> str:
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


@dataclass
class CacheStats:
    """The backend's health, for the tests and the benchmarks (hits and misses are the
    fast path's to count: ``dedup.DedupStats``)."""

    errors: int = 0
    unreadable: int = 0  # entries that no longer parse (answered as misses)
    lookup_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))


class Backend(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def get_many(self, keys: list[str]) -> list[bytes | None]: ...
    async def set_many(self, items: list[tuple[str, bytes]], ttl_s: float) -> None: ...
    async def set_if_absent(self, key: str, value: bytes, ttl_s: float) -> bool: ...
    async def delete_if_equal(self, key: str, value: bytes) -> None: ...
    async def expire_if_equal(self, key: str, value: bytes, ttl_s: float) -> None: ...


class MemoryBackend:
    """Process memory, least recently used first out beyond ``max_entries``."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self._data: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._max_entries = max_entries

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        return [self._get(key) for key in keys]

    async def set_many(self, items: list[tuple[str, bytes]], ttl_s: float) -> None:
        for key, value in items:
            self._set(key, value, ttl_s)

    async def set_if_absent(self, key: str, value: bytes, ttl_s: float) -> bool:
        if self._get(key) is not None:
            return False
        self._set(key, value, ttl_s)
        return True

    async def delete_if_equal(self, key: str, value: bytes) -> None:
        if self._get(key) == value:
            del self._data[key]

    async def expire_if_equal(self, key: str, value: bytes, ttl_s: float) -> None:
        if self._get(key) == value:
            self._set(key, value, ttl_s)

    def _get(self, key: str) -> bytes | None:
        item = self._data.get(key)
        if item is None:
            return None
        if item[1] <= time.monotonic():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return item[0]

    def _set(self, key: str, value: bytes, ttl_s: float) -> None:
        self._data[key] = (value, time.monotonic() + ttl_s)
        self._data.move_to_end(key)
        while len(self._data) > self._max_entries:
            self._data.popitem(last=False)


_DELETE_IF_EQUAL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_EXPIRE_IF_EQUAL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


class RedisBackend:
    """``redis.asyncio`` with short timeouts: a slow Redis must not slow the worker."""

    def __init__(self, url: str, timeout_s: float = 0.25) -> None:
        self._url = url
        self._timeout_s = timeout_s
        self._client: Redis | None = None

    async def start(self) -> None:
        if self._client is None:
            self._client = Redis.from_url(
                self._url,
                socket_timeout=self._timeout_s,
                socket_connect_timeout=self._timeout_s,
                health_check_interval=10,
            )

    async def stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        values = await self._require().mget(keys)
        return [v.encode() if isinstance(v, str) else v for v in values]

    async def set_many(self, items: list[tuple[str, bytes]], ttl_s: float) -> None:
        async with self._require().pipeline(transaction=False) as pipe:
            for key, value in items:
                pipe.set(key, value, px=int(ttl_s * 1000))
            await pipe.execute()

    async def set_if_absent(self, key: str, value: bytes, ttl_s: float) -> bool:
        return bool(await self._require().set(key, value, nx=True, px=int(ttl_s * 1000)))

    async def delete_if_equal(self, key: str, value: bytes) -> None:
        await self._require().eval(_DELETE_IF_EQUAL, 1, key, value)

    async def expire_if_equal(self, key: str, value: bytes, ttl_s: float) -> None:
        await self._require().eval(_EXPIRE_IF_EQUAL, 1, key, value, int(ttl_s * 1000))

    def _require(self) -> Redis:
        if self._client is None:
            raise RuntimeError("RedisBackend is not started")
        return self._client


class ResultCache:
    """Cache, request-id store and locks, resilient to a failing backend."""

    def __init__(
        self,
        backend: Backend,
        ttl_s: float,
        request_ttl_s: float,
        namespace: str = "zimage:v1",
        backoff_s: float = 1.0,
    ) -> None:
        self._backend = backend
        self._ttl_s = ttl_s
        self._request_ttl_s = request_ttl_s
        self._ns = namespace
        self._backoff_s = backoff_s
        self._down_until = 0.0
        self.stats = CacheStats()

    @classmethod
    def from_settings(cls, settings: CacheSettings) -> ResultCache:
        """Redis when ``ZIMAGE_REDIS_URL`` is set, else process memory."""
        backend: Backend = (
            RedisBackend(settings.redis_url, settings.redis_timeout_ms / 1000)
            if settings.redis_url
            else MemoryBackend()
        )
        return cls(backend, settings.ttl_s, settings.request_id_ttl_s)

    @property
    def degraded(self) -> bool:
        """Whether the backend failed and has not answered since: the cache steps aside
        (lookups miss, writes are skipped, locks are granted locally) until it does."""
        return self._down_until != 0.0

    async def start(self) -> None:
        await self._backend.start()

    async def stop(self) -> None:
        await self._backend.stop()

    async def __aenter__(self) -> ResultCache:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def find(self, request_id: str, key: str) -> CacheEntry | None:
        """The stored result of this request id, else of this content (None on a miss)."""
        started = time.perf_counter()
        raw = await self._guard(self._backend.get_many([self._req(request_id), self._res(key)]))
        self.stats.lookup_seconds.append(time.perf_counter() - started)
        by_id, by_content = raw if raw is not None else (None, None)
        entry = self._parse(by_id, self._req(request_id))
        if entry is not None:
            if entry.content_key != key:
                log.warning(
                    "request_id_reused_with_other_params",
                    request_id=request_id,
                    note="answered from the stored result, not recomputed",
                )
            return entry
        return self._parse(by_content, self._res(key))

    async def peek(self, key: str) -> CacheEntry | None:
        raw = await self._guard(self._backend.get_many([self._res(key)]))
        return self._parse(raw[0] if raw else None, self._res(key))

    def _parse(self, raw: bytes | None, name: str) -> CacheEntry | None:
        """A stored entry, or None when there is none or it no longer parses (an older
        layout, a bad write): such an entry is a miss, overwritten by the next result."""
        if raw is None:
            return None
        try:
            return CacheEntry.model_validate_json(raw)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            self.stats.unreadable += 1
            log.warning("cache_entry_unreadable", key=name, error=str(exc)[:200])
            return None

    async def remember(self, request_ids: list[str], entry: CacheEntry) -> None:
        """Store a succeeded result under its content and under each request id."""
        value = entry.model_dump_json().encode()
        items = [(self._res(entry.content_key), value)]
        await self._guard(self._backend.set_many(items, self._ttl_s))
        requests = [(self._req(rid), value) for rid in request_ids]
        await self._guard(self._backend.set_many(requests, self._request_ttl_s))

    async def try_lock(self, key: str, owner: str, ttl_s: float) -> bool:
        """Whether this worker may compute ``key`` (granted when the backend is down)."""
        granted = await self._guard(
            self._backend.set_if_absent(self._lock(key), owner.encode(), ttl_s)
        )
        return True if granted is None else bool(granted)

    async def unlock(self, key: str, owner: str) -> None:
        await self._guard(self._backend.delete_if_equal(self._lock(key), owner.encode()))

    async def extend_lock(self, key: str, owner: str, ttl_s: float) -> None:
        """Keep holding ``key`` for another ``ttl_s`` (only if ``owner`` still holds it)."""
        await self._guard(self._backend.expire_if_equal(self._lock(key), owner.encode(), ttl_s))

    async def _guard(self, operation: Any) -> Any:
        """Run a backend call; on failure count it, step aside for a while, return None."""
        if time.monotonic() < self._down_until:
            operation.close()
            return None
        try:
            result = await operation
        except (RedisError, OSError, TimeoutError) as exc:
            self.stats.errors += 1
            if self._down_until == 0.0 or time.monotonic() >= self._down_until:
                log.warning("cache_unavailable", error=repr(exc), backoff_s=self._backoff_s)
            self._down_until = time.monotonic() + self._backoff_s
            return None
        if self._down_until:
            log.info("cache_available_again")
            self._down_until = 0.0
        return result

    def _req(self, request_id: str) -> str:
        return f"{self._ns}:req:{request_id}"

    def _res(self, key: str) -> str:
        return f"{self._ns}:res:{key}"

    def _lock(self, key: str) -> str:
        return f"{self._ns}:lock:{key}"
