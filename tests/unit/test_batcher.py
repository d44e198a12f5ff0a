import json
from types import SimpleNamespace
from typing import cast

import pytest

from zimage_stream.batcher import Batcher
from zimage_stream.client import generate_request
from zimage_stream.consumer import Delivery
from zimage_stream.generations import Pending
from zimage_stream.schemas import GenerateRequest, ModelInfo, parse_request

A, B = ("generate", 512), ("generate", 1024)


def test_a_batch_is_ready_when_its_window_has_passed() -> None:
    batcher: Batcher[str] = Batcher(window_s=0.05, max_images=8)
    batcher.add("r1", A, 1, now=10.0)
    batcher.add("r2", A, 1, now=10.02)
    assert not batcher.ready(10.04)
    assert batcher.take(10.04) is None
    assert batcher.next_deadline() == pytest.approx(10.05)
    batch = batcher.take(10.05)
    assert batch is not None and batch.items == ["r1", "r2"] and batch.images == 2
    assert len(batcher) == 0 and batcher.next_deadline() is None


def test_a_full_batch_is_ready_at_once() -> None:
    batcher: Batcher[str] = Batcher(window_s=10, max_images=8)
    batcher.add("r1", A, 4, now=0)
    batcher.add("r2", A, 4, now=0)
    batch = batcher.take(0)
    assert batch is not None and batch.items == ["r1", "r2"]


def test_a_request_that_would_overflow_starts_the_next_batch() -> None:
    batcher: Batcher[str] = Batcher(window_s=10, max_images=8)
    batcher.add("r1", A, 4, now=0)
    batcher.add("r2", A, 3, now=0)
    batcher.add("r3", A, 4, now=1)  # 4 + 3 + 4 > 8: r1 and r2 go now, r3 waits
    first = batcher.take(1)
    assert first is not None and first.items == ["r1", "r2"]
    assert batcher.take(1) is None
    later = batcher.take(11)
    assert later is not None and later.items == ["r3"]


def test_a_request_larger_than_the_limit_runs_alone() -> None:
    batcher: Batcher[str] = Batcher(window_s=10, max_images=2)
    batcher.add("big", A, 8, now=0)
    batch = batcher.take(0)
    assert batch is not None and batch.items == ["big"] and batch.images == 8


def test_only_compatible_requests_share_a_batch_and_oldest_goes_first() -> None:
    batcher: Batcher[str] = Batcher(window_s=0.1, max_images=8)
    batcher.add("b1", B, 1, now=0.0)
    batcher.add("a1", A, 1, now=0.05)
    batcher.add("b2", B, 1, now=0.06)
    first = batcher.take(0.2)
    second = batcher.take(0.2)
    assert first is not None and first.key == B and first.items == ["b1", "b2"]
    assert second is not None and second.key == A and second.items == ["a1"]


def test_zero_window_makes_every_batch_ready_immediately() -> None:
    batcher: Batcher[str] = Batcher(window_s=0, max_images=8)
    batcher.add("r1", A, 1, now=5)
    assert batcher.ready(5)


def test_drain_takes_every_batch_ready_or_not() -> None:
    batcher: Batcher[str] = Batcher(window_s=10, max_images=8)
    batcher.add("a1", A, 1, now=0)
    batcher.add("b1", B, 1, now=1)
    batcher.add("a2", A, 1, now=2)
    drained = batcher.drain()
    assert [b.items for b in drained] == [["a1", "a2"], ["b1"]]
    assert len(batcher) == 0


def test_invalid_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        Batcher(window_s=-1, max_images=1)
    with pytest.raises(ValueError):
        Batcher(window_s=0, max_images=0)


def _pending(request_id: str, caption_tokens: int) -> Pending:
    request = parse_request(json.dumps(generate_request("a mug", request_id)).encode(), 10**6)
    assert isinstance(request, GenerateRequest)
    delivery = cast(Delivery, SimpleNamespace(record=SimpleNamespace(timestamp=0)))
    model = ModelInfo(id="tiny", revision=None, device="cpu", dtype="float32")
    return Pending.admit(delivery, request, model, caption_tokens)


def test_requests_batch_only_with_captions_of_their_length_bucket() -> None:
    """Captions pad to multiples of 32 tokens; batch mates of another bucket would need an
    attention mask, which changes an image's pixels by rounding."""
    batcher: Batcher[Pending] = Batcher(window_s=0.05, max_images=8)
    for request_id, tokens in [("short", 20), ("long", 40), ("short-too", 32), ("long-too", 64)]:
        pending = _pending(request_id, tokens)
        batcher.add(pending, pending.batch_key, 1, now=0)
    batches = []
    while (batch := batcher.take(1.0)) is not None:
        batches.append(sorted(p.request.request_id for p in batch.items))
    assert sorted(batches) == [["long", "long-too"], ["short", "short-too"]]
