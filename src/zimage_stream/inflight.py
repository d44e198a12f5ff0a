"""In-flight dedup: identical content computed once, however many requests ask for it.

Pure bookkeeping. The first request of a content key becomes its *leader* (it is batched,
or waits for another worker that holds the key's lock); identical requests that arrive
before the leader is answered become its *followers* and are answered with the leader's
result. ``settle`` ends the key and hands back the followers.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class InFlight(Generic[T]):
    """Content keys being computed, each with the requests waiting for it."""

    def __init__(self) -> None:
        self._followers: dict[str, list[T]] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._followers

    def __len__(self) -> int:
        return len(self._followers)

    def lead(self, key: str) -> bool:
        """Claim ``key``; False when another request already leads it."""
        if key in self._followers:
            return False
        self._followers[key] = []
        return True

    def follow(self, key: str, item: T) -> None:
        """Wait for the leader of ``key`` (which must exist)."""
        self._followers[key].append(item)

    def settle(self, key: str) -> list[T]:
        """End ``key``; returns the followers to answer with the leader's result."""
        return self._followers.pop(key, [])

    def followers(self, key: str) -> list[T]:
        return list(self._followers.get(key, []))
