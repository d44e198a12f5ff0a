"""Step progress events on the progress topic: in order, throttled, read by submit --wait."""

from __future__ import annotations

from tests.integration.conftest import KafkaIO, generate
from zimage_stream.client import ZImageClient
from zimage_stream.engine.calls import Faults
from zimage_stream.settings import Settings
from zimage_stream.testing import running_worker
from zimage_stream.topics import ensure_topics


async def test_progress_events_arrive_in_order_and_are_throttled(
    settings: Settings, kafka_io: KafkaIO, unique: str
) -> None:
    settings = settings.replace(**{"progress_topic": f"prog-{unique}"})
    await ensure_topics(settings.kafka, 3)
    slow = generate("slow", "a clock", num_inference_steps=8)
    fast = generate("fast", "a fan", num_inference_steps=8)
    async with running_worker(settings) as worker:
        async with ZImageClient(settings=settings.kafka, timeout_s=120) as client:
            await client.start_reader()
            submission = client.watch("slow")
            # 0.3 s a step: above the 0.25 s throttle, so every step is reported.
            await worker.engine.set_faults(Faults(step_sleep_s=0.3))
            await kafka_io.send(slow)
            seen = [event.step async for event in submission.progress()]
            result = await submission.result()
        assert result.status == "succeeded"  # progress records did not confuse the client
        assert seen == [1, 2, 3, 4, 5, 6, 7, 8]  # the client's iterator saw every step
        await worker.engine.set_faults(Faults())  # the miniature model's steps take milliseconds
        await kafka_io.send(fast)
        await kafka_io.results(2)
        events = [e.json() for e in await kafka_io.read(settings.kafka.progress_topic, 10)]
    steps = {rid: [e["step"] for e in events if e["request_id"] == rid] for rid in ("slow", "fast")}
    assert steps["slow"] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert all(e["total"] == 8 for e in events)
    # Throttled: the first and the last step always, little in between.
    assert steps["fast"][0] == 1 and steps["fast"][-1] == 8 and len(steps["fast"]) < 8
    assert steps["fast"] == sorted(steps["fast"])
