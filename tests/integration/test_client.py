"""The client library as an upstream service uses it, against the real broker and worker;
and one request published by confluent-kafka, a Kafka client no one here wrote."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.integration.conftest import KafkaIO, generate
from tests.support.render import LATIN_FONT, png_bytes, product_scene, with_text
from zimage_stream import client as client_module
from zimage_stream.client import ResultTimeout, ZImageClient
from zimage_stream.schemas import ProgressEvent, ResultEvent
from zimage_stream.settings import Settings
from zimage_stream.testing import running_worker
from zimage_stream.topics import ensure_topics


class _CountedConsumer(client_module.AIOKafkaConsumer):  # type: ignore[misc]
    made = 0

    def __init__(self, *args: object, **kwargs: object) -> None:
        type(self).made += 1
        assert kwargs.get("group_id") is None  # a reader, never a group member
        super().__init__(*args, **kwargs)


async def test_many_concurrent_calls_share_one_results_reader(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "AIOKafkaConsumer", _CountedConsumer)
    settings = settings.replace(progress_topic=f"{settings.kafka.results_topic}-progress")
    await ensure_topics(settings.kafka, settings.kafka.topic_partitions)
    prompts = [f"product {i % 8}" for i in range(24)]  # repeats too: cache hits and followers
    seen: list[ProgressEvent] = []
    async with running_worker(settings), ZImageClient(settings=settings.kafka) as client:
        results = await asyncio.gather(
            *(
                client.generate(
                    prompt,
                    width=256,
                    height=256,
                    num_images=1,
                    steps=2,
                    request_id=f"many-{i}",
                    timeout_s=300,
                    on_progress=seen.append,
                )
                for i, prompt in enumerate(prompts)
            )
        )
    assert [r.request_id for r in results] == [f"many-{i}" for i in range(24)]
    assert all(isinstance(r, ResultEvent) and r.status == "succeeded" for r in results)
    # The same prompt gives the same image, whichever call computed it.
    by_prompt: dict[str, set[str]] = {}
    for prompt, result in zip(prompts, results, strict=True):
        by_prompt.setdefault(prompt, set()).add(result.images[0].sha256)
    assert all(len(shas) == 1 for shas in by_prompt.values())
    assert _CountedConsumer.made == 1
    assert seen and {e.request_id for e in seen} <= {f"many-{i}" for i in range(24)}
    assert all(e.step <= e.total == 2 for e in seen)


async def test_a_call_with_no_result_in_time_raises(settings: Settings) -> None:
    await ensure_topics(settings.kafka, settings.kafka.topic_partitions)
    async with ZImageClient(settings=settings.kafka) as client:  # no worker is running
        with pytest.raises(ResultTimeout) as info:
            await client.generate("a mug", request_id="nobody-answers", timeout_s=1)
    assert info.value.request_id == "nobody-answers"
    assert isinstance(info.value, TimeoutError)


async def test_erase_takes_bytes_a_path_or_a_uri(settings: Settings, tmp_path: Path) -> None:
    rendered = with_text(
        product_scene(480, 360), [("SALE", (30, 30), LATIN_FONT, 40, (200, 20, 20))]
    )
    data = png_bytes(rendered.image)
    local = tmp_path / "banner.png"
    local.write_bytes(data)
    upload = Path(settings.storage.url) / "uploads" / "banner.png"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(data)
    async with running_worker(settings), ZImageClient(settings=settings.kafka) as client:
        results = await asyncio.gather(
            client.erase(data, engine="classical", timeout_s=300),
            client.erase(local, engine="classical", timeout_s=300),
            client.erase(upload.as_uri(), engine="classical", timeout_s=300),
            client.erase("file:///etc/passwd", timeout_s=300),
        )
    for result in results[:3]:
        assert result.status == "succeeded", result.error
        assert any("SALE" in region.text for region in result.text_regions)
    assert results[3].error is not None and results[3].error.code == "source_forbidden"


async def test_a_request_published_by_confluent_kafka_is_answered(
    settings: Settings, kafka_io: KafkaIO
) -> None:
    confluent = pytest.importorskip("confluent_kafka")
    request = generate("from-confluent", "a brass door handle")
    async with running_worker(settings), ZImageClient(settings=settings.kafka) as client:
        await client.start_reader()
        answer = client.watch("from-confluent")

        def publish() -> None:
            producer = confluent.Producer(
                {"bootstrap.servers": settings.kafka.bootstrap_servers, "acks": "all"}
            )
            producer.produce(
                settings.kafka.requests_topic,
                json.dumps(request).encode(),
                key=b"from-confluent",
                headers=[
                    ("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
                ],
            )
            assert producer.flush(30) == 0

        await asyncio.to_thread(publish)
        result = await answer.result(timeout_s=300)
    assert result.status == "succeeded" and len(result.images) == 1
    (event,) = [e for e in await kafka_io.read(settings.kafka.results_topic, 1)]
    assert event.headers["traceparent"].startswith(b"00-0af7651916cd43dd")
