"""Faults through the real broker: slow inference past its budget, the device running
out of memory (injected: this machine has no GPU), and a flood of poison messages.
Every test counts requests in and results out."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from typing import Any

import pytest
from aiokafka.errors import MessageSizeTooLargeError

from tests.integration.conftest import KafkaIO, generate, wait_for_ids
from zimage_stream.engine.calls import Faults
from zimage_stream.producer import ResultProducer
from zimage_stream.settings import Settings
from zimage_stream.testing import running_worker


async def _wait_committed(kafka_io: KafkaIO, total: int) -> int:
    deadline, committed = time.monotonic() + 30, 0
    while time.monotonic() < deadline:
        committed = sum((await kafka_io.committed()).values())
        if committed >= total:
            break
    return committed


async def test_a_request_past_its_budget_times_out_and_its_batch_mates_finish(
    settings: Settings, kafka_io: KafkaIO
) -> None:
    settings = settings.replace(batch_window_ms=1500)
    short = {**generate("short", "a mug on a desk"), "timeout_s": 1}
    steps = {**generate("long", "a cup on a desk"), "timeout_s": 60}
    steps["params"]["num_inference_steps"] = short["params"]["num_inference_steps"] = 8
    async with running_worker(settings) as worker:
        # Each denoising step takes 0.3 s: the 1 s budget runs out around step 4 of 8.
        await worker.engine.set_faults(Faults(step_sleep_s=0.3))
        await kafka_io.send(short)
        await kafka_io.send(steps)
        results = {r["request_id"]: r for r in await kafka_io.results(2)}
        assert await _wait_committed(kafka_io, 2) == 2
        assert worker.engine.run_stats["timeouts"] == 1
    assert results["short"]["status"] == "timed_out"
    assert results["short"]["error"]["code"] == "timeout"
    assert results["short"]["error"]["retriable"] is True
    # Stopped within about one step of its budget, not after all eight.
    assert results["short"]["timings_ms"]["inference"] < (1 + 0.3 + 1) * 1000
    assert results["long"]["status"] == "succeeded" and len(results["long"]["images"]) == 1


async def test_an_identical_request_with_more_time_does_not_inherit_a_timeout(
    settings: Settings, kafka_io: KafkaIO
) -> None:
    hasty = {**generate("hasty", "a mug on a desk", num_inference_steps=8), "timeout_s": 1}
    patient = {**generate("patient", "a mug on a desk", num_inference_steps=8), "timeout_s": 300}
    async with running_worker(settings) as worker:
        await worker.engine.set_faults(Faults(step_sleep_s=0.3))
        await kafka_io.send(hasty, partition=0)
        await kafka_io.send(patient, partition=0)  # identical content, following "hasty"
        results = {r["request_id"]: r for r in await kafka_io.results(2)}
    assert results["hasty"]["status"] == "timed_out"
    assert results["patient"]["status"] == "succeeded", results["patient"]["error"]
    assert results["patient"]["cache_hit"] is False


async def test_a_prompt_longer_than_the_model_takes_is_refused_alone(
    settings: Settings, kafka_io: KafkaIO
) -> None:
    settings = settings.replace(batch_window_ms=1000)
    async with running_worker(settings) as worker:
        long = generate("long", "a mug with a long description " * 40)
        await kafka_io.send(long)
        await kafka_io.send(generate("short", "a mug"))
        results = {r["request_id"]: r for r in await kafka_io.results(2)}
        (dead,) = await kafka_io.read(settings.kafka.dlq_topic, 1)
        assert worker.stats["batch_requests"] == 1  # the long one never reached the model
    assert results["long"]["status"] == "rejected"
    assert results["long"]["error"]["code"] == "invalid_request"
    assert f"at most {worker.engine.caption_limit}" in results["long"]["error"]["message"]
    assert dead.headers["error.code"] == b"invalid_request" and dead.json() == long
    assert results["short"]["status"] == "succeeded"


async def test_out_of_memory_splits_the_batch_then_answers_clearly(
    settings: Settings, kafka_io: KafkaIO
) -> None:
    settings = settings.replace(batch_window_ms=1500)

    async with running_worker(settings) as worker:
        await worker.engine.set_faults(Faults(oom_over_images=2))  # calls with more run out
        for index in range(4):
            await kafka_io.send(generate(f"fits-{index}", f"a lamp, view {index}"))
        first = await kafka_io.results(4)
        await worker.engine.set_faults(Faults(oom_over_images=0))  # now not even one image
        await kafka_io.send(generate("never-fits", "a vase"))
        second = await kafka_io.results(5)
        await worker.engine.set_faults(Faults())  # memory is back: the worker carries on
        await kafka_io.send(generate("after", "a bowl"))
        third = await kafka_io.results(6)
        assert await _wait_committed(kafka_io, 6) == 6
        assert worker.engine.run_stats["oom_splits"] >= 1
    assert Counter(r["status"] for r in first) == {"succeeded": 4}
    never = next(r for r in second if r["request_id"] == "never-fits")
    assert never["status"] == "failed"
    assert never["error"]["code"] == "out_of_memory" and never["error"]["retriable"] is True
    assert next(r for r in third if r["request_id"] == "after")["status"] == "succeeded"


def _poison(rng: random.Random, index: int, max_bytes: int) -> bytes | None:
    """One malformed message of many kinds, some with a readable request id."""
    request_id = f"poison-{index}"
    valid: dict[str, Any] = generate(request_id)
    kind = index % 9
    if kind == 0:
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200)))
    if kind == 1:
        return json.dumps(valid).encode()[: rng.randint(1, 40)]  # truncated
    if kind == 2:
        valid["params"]["width"] = rng.choice(["wide", -16, 10_000, None, [1]])
    elif kind == 3:
        valid["task"] = rng.choice(["upscale", "", 7])
    elif kind == 4:
        valid["schema_version"] = rng.choice([0, 2, 99])
    elif kind == 5:
        valid["params"]["prompt"] = "x" * rng.randint(5000, 20000)  # over the prompt limit
    elif kind == 6:
        return b'{"request_id": "' + b"y" * (max_bytes + 10) + b'"}'  # over the message limit
    elif kind == 7:
        valid["params"]["num_images"] = rng.choice([0, 9, "four", 2.5])
    else:
        return rng.choice([b"null", b"[]", b"42", b'"generate"', b"{}"])
    return json.dumps(valid).encode()


async def test_a_flood_of_poison_messages_is_answered_or_dead_lettered(
    settings: Settings, kafka_io: KafkaIO
) -> None:
    settings = settings.replace(max_message_bytes=64 * 1024)
    rng = random.Random(7)
    poison = [_poison(rng, i, settings.kafka.max_message_bytes) for i in range(180)]
    async with running_worker(settings) as worker:
        for index, raw in enumerate(poison):
            await kafka_io.send(raw or b"", key=f"k{index}".encode())
            if index % 60 == 30:
                await kafka_io.send(generate(f"good-{index}", f"a plate {index}"))
        good = 3
        results = await kafka_io.results(len(poison) + good)
        dead = await kafka_io.read(settings.kafka.dlq_topic, len(poison))
        assert await _wait_committed(kafka_io, len(poison) + good) == len(poison) + good
        assert worker.stats["dead_letters"] == len(poison)
    statuses = Counter(r["status"] for r in results)
    assert statuses == {"rejected": len(poison), "succeeded": good}
    assert len(dead) == len(poison)
    answered_ids = {r["request_id"] for r in results if r["status"] == "rejected"}
    # Every poison message whose id could be read was answered under that id.
    readable = {f"poison-{i}" for i in range(len(poison)) if i % 9 in (2, 5, 7)}
    assert readable <= answered_ids


async def test_results_and_dead_letters_that_cannot_be_sent_are_settled(
    settings: Settings, kafka_io: KafkaIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DLQ refuses every copy; one result is refused for good (too large, say) while a
    failed one would go through; one is refused whatever it says. The records are answered
    where possible, counted, and the partition still moves to its end."""
    real_send = ResultProducer._send

    async def refusing_send(
        self: ResultProducer, topic: str, key: Any, value: Any, *rest: Any
    ) -> None:
        too_big = key == b"too-big" and b'"status":"succeeded"' in value
        if topic == settings.kafka.dlq_topic or too_big or key == b"refused":
            raise MessageSizeTooLargeError()
        await real_send(self, topic, key, value, *rest)

    monkeypatch.setattr(ResultProducer, "_send", refusing_send)
    async with running_worker(settings) as worker:
        await kafka_io.send(generate("before"), partition=0)
        await kafka_io.send(b"not json", key=b"junk", partition=0)
        await kafka_io.send(generate("too-big", "another mug"), partition=0)
        await kafka_io.send(generate("refused", "a third mug"), partition=0)
        await kafka_io.send(generate("after", "a fourth mug"), partition=0)
        results = await wait_for_ids(kafka_io, {"before", "too-big", "after"}, timeout_s=120)
        deadline = asyncio.get_running_loop().time() + 30
        while (await kafka_io.committed()).get(0) != 5:
            assert asyncio.get_running_loop().time() < deadline, await kafka_io.committed()
            await asyncio.sleep(0.2)
        # Given up: the dead letter, the too-big result, and both results of "refused".
        assert worker.undelivered() == {"dead_letter": 1, "result": 3}
    by_id = {r["request_id"]: r for r in results}
    assert by_id["before"]["status"] == by_id["after"]["status"] == "succeeded"
    assert by_id[None]["error"]["code"] == "invalid_json"  # answered though not dead-lettered
    assert by_id["too-big"]["status"] == "failed"
    assert by_id["too-big"]["error"]["code"] == "internal"
    assert "refused" not in by_id
