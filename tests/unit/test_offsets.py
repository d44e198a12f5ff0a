import pytest

from zimage_stream.offsets import OffsetTracker


def test_commits_up_to_the_lowest_unanswered_offset() -> None:
    tracker = OffsetTracker()
    for offset in (5, 6, 7, 8):
        tracker.track(offset)
    tracker.done(7)  # a cache hit overtakes the batch
    assert tracker.committable() == 5
    tracker.done(5)
    assert tracker.committable() == 6
    tracker.done(6)
    assert tracker.committable() == 8
    tracker.done(8)
    assert tracker.committable() == 9
    assert len(tracker) == 0


def test_nothing_new_to_commit_after_mark_committed() -> None:
    tracker = OffsetTracker()
    tracker.track(0)
    assert tracker.committable() is None  # offset 0 is unanswered: nothing to commit yet
    tracker.done(0)
    assert tracker.committable() == 1
    tracker.mark_committed(1)
    assert tracker.committable() is None
    tracker.track(1)
    tracker.done(1)
    assert tracker.committable() == 2


def test_offsets_must_increase() -> None:
    tracker = OffsetTracker()
    tracker.track(3)
    with pytest.raises(ValueError):
        tracker.track(3)


def test_next_offset_follows_the_highest_tracked_answered_or_not() -> None:
    tracker = OffsetTracker()
    assert tracker.next_offset() is None
    tracker.track(4)
    tracker.track(6)  # a gap: offset 5 was skipped
    assert tracker.next_offset() == 7
    tracker.done(6)
    assert tracker.next_offset() == 7
