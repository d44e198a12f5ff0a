"""Which offsets may be committed. Pure bookkeeping, one tracker per assigned partition.

An offset is committable only when the result events of it and of every offset below it
have been acknowledged by the broker, so a crash never skips an unanswered request
(at-least-once). Results finish out of order (a cache hit overtakes a batch); the
tracker commits up to the lowest offset still pending.
"""

from __future__ import annotations

import heapq


class OffsetTracker:
    """Pending offsets of one partition during one assignment."""

    def __init__(self) -> None:
        self._pending: set[int] = set()
        self._heap: list[int] = []
        self._highest_seen = -1
        self._committed: int | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def track(self, offset: int) -> None:
        """A record at ``offset`` was read and is now being processed."""
        if offset <= self._highest_seen:
            raise ValueError(f"offset {offset} tracked after {self._highest_seen}")
        self._highest_seen = offset
        self._pending.add(offset)
        heapq.heappush(self._heap, offset)

    def done(self, offset: int) -> None:
        """The record at ``offset`` has its result (or dead-letter) acknowledged."""
        self._pending.discard(offset)

    def position(self) -> int:
        """The lowest offset not answered yet (everything before it is answered)."""
        while self._heap and self._heap[0] not in self._pending:
            heapq.heappop(self._heap)
        return self._heap[0] if self._heap else self._highest_seen + 1

    def next_offset(self) -> int | None:
        """The offset after the highest one tracked; None before the first."""
        return self._highest_seen + 1 if self._highest_seen >= 0 else None

    def committable(self) -> int | None:
        """The offset to commit (the next one to read after a restart), or None if nothing new."""
        position = self.position()
        if position <= 0 or position == self._committed:
            return None
        return position

    def mark_committed(self, offset: int) -> None:
        self._committed = offset
