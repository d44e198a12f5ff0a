"""A worker's state as ``metrics.WorkerState`` reads it, with values a test sets."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FakeWorkerState:
    stats: dict[str, int] = field(default_factory=lambda: {"dead_letters": 0})
    cache: dict[str, int] = field(default_factory=dict)
    lag: dict[int, int] = field(default_factory=dict)
    storage: dict[str, int] = field(default_factory=dict)
    redis: int = 0
    is_degraded: bool = False
    engine: dict[str, int] = field(default_factory=dict)

    def cache_counts(self) -> dict[str, int]:
        return self.cache

    def consumer_lag(self) -> dict[int, int]:
        return self.lag

    def in_flight(self) -> int:
        return 0

    def undelivered(self) -> dict[str, int]:
        return {}

    def engine_restarts(self) -> dict[str, int]:
        return {}

    def engine_stats(self) -> dict[str, int]:
        return self.engine

    def redis_errors(self) -> int:
        return self.redis

    def storage_errors(self) -> dict[str, int]:
        return self.storage

    def degraded(self) -> bool:
        return self.is_degraded
