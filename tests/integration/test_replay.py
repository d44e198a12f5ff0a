"""Replaying a range of the requests topic: exactly the requests in it come back; an
unforced replay is answered from the cache, a forced one is computed again."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

from tests.integration.conftest import KafkaIO, generate, run_cli
from zimage_stream.replay import replay
from zimage_stream.settings import Settings
from zimage_stream.testing import running_worker


async def test_replay_by_time_and_by_offsets(settings: Settings, kafka_io: KafkaIO) -> None:
    early, late = ["early-0", "early-1", "early-2"], ["late-0", "late-1"]
    async with running_worker(settings):
        for request_id in early:
            await kafka_io.send(generate(request_id, f"a rug {request_id}"), partition=0)
        await kafka_io.results(3)
        await asyncio.sleep(1.0)
        since = datetime.now(UTC)
        await asyncio.sleep(0.5)
        for request_id in late:
            await kafka_io.send(generate(request_id, f"a rug {request_id}"), partition=1)
        originals = await kafka_io.results(5)

        dry = await replay(settings.kafka, since=since, dry_run=True)
        assert dry.total == 2 and dry.published == 0, dry
        assert dry.ranges[0] == (3, 3) and dry.ranges[1] == (0, 2)
        assert dict(dry.by_task) == {"generate": 2}  # a dry run counts by task too

        # Unforced, by time: exactly the two late requests again, from the cache.
        done = await replay(settings.kafka, since=since)
        assert done.published == 2 and dict(done.by_task) == {"generate": 2}
        events = await kafka_io.read(settings.kafka.results_topic, 7)
        # Forced, by offsets: the first two early requests, computed again.
        forced = await replay(
            settings.kafka, from_offsets={0: 0}, to_offsets={0: 2, 1: 0}, force=True
        )
        assert forced.published == 2
        events = await kafka_io.read(settings.kafka.results_topic, 9)
    first = {r["request_id"]: r for r in originals}
    replayed = [e for e in events if e.headers.get("replay") == b"1"]
    assert sorted(e.json()["request_id"] for e in replayed) == [
        "early-0",
        "early-1",
        "late-0",
        "late-1",
    ]
    for event in replayed:
        result = event.json()
        assert result["status"] == "succeeded"
        forced_one = result["request_id"].startswith("early")
        assert result["cache_hit"] is (not forced_one)  # forced: computed, not recalled
        if forced_one:
            assert result["timings_ms"]["inference"] > 0
        # Provenance lets a replayed result be compared with the original: same model,
        # same images (the seed is part of the request).
        original = first[result["request_id"]]
        assert result["model"] == original["model"]
        assert result["provenance"] == original["provenance"]
        assert result["provenance"]["num_inference_steps"] == 2
        assert [i["sha256"] for i in result["images"]] == [i["sha256"] for i in original["images"]]


async def test_replay_command_dry_run_prints_a_summary(
    settings: Settings, kafka_io: KafkaIO
) -> None:
    for index in range(3):
        await kafka_io.send(generate(f"cli-{index}"), partition=2)
    erase = {**generate("cli-erase"), "task": "erase_text"}
    await kafka_io.send(erase, partition=2)
    code, out, err = await run_cli(settings, "replay", "--from-offset", "2:1", "--dry-run")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["dry_run"] is True and summary["published"] == 0
    assert summary["by_task"] == {"generate": 2, "erase_text": 1}
    assert summary["ranges"]["2"] == [1, 4] and summary["requests_in_range"] == 3
    code, _, err = await run_cli(settings, "replay")
    assert code == 2 and "--since" in err
