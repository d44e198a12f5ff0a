from zimage_stream.inflight import InFlight


def test_first_request_leads_and_identical_ones_follow() -> None:
    inflight: InFlight[str] = InFlight()
    assert inflight.lead("k")
    assert not inflight.lead("k")
    inflight.follow("k", "r2")
    inflight.follow("k", "r3")
    assert "k" in inflight and len(inflight) == 1
    assert inflight.followers("k") == ["r2", "r3"]
    assert inflight.settle("k") == ["r2", "r3"]
    assert "k" not in inflight
    assert inflight.settle("k") == []
    assert inflight.lead("k")  # a later identical request starts afresh
