"""Micro-batching by time window and size. Pure: no I/O, no clock of its own.

Requests that can share one pipeline call (same :class:`BatchKey`) collect in an open
batch. A batch is *ready* when it holds ``max_images`` images, when the next request of
its key would not fit, or when ``window_s`` has passed since its first request. The
engine loop takes the oldest ready batch whenever the device is free, so under load the
batches fill up while the device works and an idle device waits at most one window.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class Batch(Generic[T]):
    """Requests that go through one pipeline call."""

    key: Hashable
    opened_at: float
    items: list[T] = field(default_factory=list)
    images: int = 0
    closed: bool = False

    def __len__(self) -> int:
        return len(self.items)


class Batcher(Generic[T]):
    """Collects items into batches per key; see the module docstring for when one is ready."""

    def __init__(self, window_s: float, max_images: int) -> None:
        if window_s < 0 or max_images < 1:
            raise ValueError("window_s must be >= 0 and max_images >= 1")
        self._window_s = window_s
        self._max_images = max_images
        self._open: dict[Hashable, Batch[T]] = {}
        self._closed: list[Batch[T]] = []

    def __len__(self) -> int:
        """Items waiting, in open and closed batches."""
        return sum(len(b) for b in self._open.values()) + sum(len(b) for b in self._closed)

    def add(self, item: T, key: Hashable, images: int, now: float) -> None:
        """Add an item that needs ``images`` images; a request is never split across calls."""
        batch = self._open.get(key)
        if batch is not None and batch.images + images > self._max_images:
            self._close(batch)
            batch = None
        if batch is None:
            batch = self._open[key] = Batch(key=key, opened_at=now)
        batch.items.append(item)
        batch.images += images
        if batch.images >= self._max_images:
            self._close(batch)

    def ready(self, now: float) -> bool:
        return bool(self._closed) or any(self._expired(b, now) for b in self._open.values())

    def next_deadline(self) -> float | None:
        """When the oldest open batch's window closes (None when nothing is open)."""
        if not self._open:
            return None
        return min(b.opened_at for b in self._open.values()) + self._window_s

    def take(self, now: float) -> Batch[T] | None:
        """The oldest ready batch, removed from the batcher; None when none is ready."""
        for batch in list(self._open.values()):
            if self._expired(batch, now):
                self._close(batch)
        if not self._closed:
            return None
        oldest = min(self._closed, key=lambda b: b.opened_at)
        self._closed.remove(oldest)
        return oldest

    def drain(self) -> list[Batch[T]]:
        """Every batch, ready or not, oldest first (for shutdown)."""
        for batch in list(self._open.values()):
            self._close(batch)
        batches = sorted(self._closed, key=lambda b: b.opened_at)
        self._closed = []
        return batches

    def _expired(self, batch: Batch[T], now: float) -> bool:
        return now - batch.opened_at >= self._window_s

    def _close(self, batch: Batch[T]) -> None:
        batch.closed = True
        self._open.pop(batch.key, None)
        self._closed.append(batch)
