"""No single record stops the stream: generated hostile records through the real broker.

Hypothesis draws a stream of records (huge numbers, deep nesting, odd dates, other text
encodings, random bytes, oversized values, odd headers and header names that are not
UTF-8, every compression codec) with
valid requests among them, all on one partition. One worker serves the stream; it must
never exit, every record must be answered (exactly one result each, the malformed ones
dead-lettered too), and the group's committed offset must reach the end of the partition.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.integration.conftest import KafkaIO
from tests.support.records import send_with_raw_header_name
from zimage_stream.settings import Settings
from zimage_stream.testing import running_worker

MAX_BYTES = 32 * 1024
CODECS = [None, "gzip", "snappy", "lz4", "zstd"]
NOT_A_REQUEST = {"invalid_json", "invalid_request", "unsupported_schema_version"}


@dataclass
class Record:
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    raw_header_name: bool = False  # a header name that is not UTF-8 (aiokafka cannot read it)


def _request(request_id: str, top: dict[str, Any] | None = None, **params: Any) -> dict[str, Any]:
    """A small valid generate request, with ``params`` and top-level fields changed."""
    return {
        "schema_version": 1,
        "request_id": request_id,
        "task": "generate",
        "params": {
            "prompt": "a mug",
            "width": 256,
            "height": 256,
            "num_images": 1,
            "num_inference_steps": 1,
            **params,
        },
        **(top or {}),
    }


def _json(document: dict[str, Any]) -> bytes:
    return json.dumps(document).encode()


@st.composite
def hostile(draw: st.DrawFn, index: int) -> Record:
    """One record of the stream; ``index`` keeps request ids apart."""
    request_id = f"h-{index}"
    kind = draw(st.sampled_from(range(12)))
    if kind == 0:  # a valid request: the model runs between the hostile ones
        prompt = draw(st.sampled_from(["a mug", "a lamp", "a chair"]))
        value = _json(_request(request_id, prompt=prompt))
    elif kind == 1:  # an integer past Python's int-string limit
        digits = draw(st.integers(4301, 6000))
        value = _json(_request(request_id)).replace(b'"num_images": 1', b'"seed": ' + b"9" * digits)
    elif kind == 2:  # nesting deeper than the recursion limit
        depth = draw(st.integers(2_000, 60_000))
        value = b"[" * depth + b"]" * depth
    elif kind == 3:  # dates timestamp() cannot take, and odd ones
        moment = draw(
            st.sampled_from(
                ["0001-01-01T00:00:00", "9999-12-31T23:59:59+14:00", "1970-01-01T00:00:00Z"]
            )
            | st.datetimes().map(lambda d: d.isoformat())
        )
        value = _json(_request(request_id, {"submitted_at": moment}))
    elif kind == 4:  # other encodings, a BOM, lone surrogates
        text = json.dumps(_request(request_id, prompt="caf\u00e9 \u6837\u54c1"), ensure_ascii=False)
        encoding = draw(st.sampled_from(["utf-16", "utf-32", "latin-1", "utf-8-sig"]))
        value = text.encode(encoding, errors="replace")
        if draw(st.booleans()):
            value = value.replace(b"caf", b"\\ud800caf")
    elif kind == 5:  # random bytes
        value = draw(st.binary(max_size=300))
    elif kind == 6:  # larger than the worker accepts
        value = b'{"request_id": "' + b"x" * (MAX_BYTES + 10) + b'"}'
    elif kind == 7:  # not an object, or no value at all (a tombstone)
        value = draw(st.sampled_from([b"null", b"[]", b"42", b'"generate"', b"{}", None]))
    elif kind == 8:  # a wrong type or an out-of-range value somewhere
        name, bad = draw(
            st.sampled_from(
                [
                    ("schema_version", True),
                    ("schema_version", 1.0),
                    ("timeout_s", 10**400),
                    ("task", ["generate"]),
                    ("request_id", "a" * 200),
                ]
            )
        )
        value = _json(_request(request_id, {name: bad}))
    elif kind == 9:  # an erase request whose source cannot be read
        source = draw(
            st.sampled_from(
                [
                    {"uri": "file:///etc/passwd"},
                    {"uri": "file:///nul%00byte.png"},
                    {"uri": "file:///" + "n" * 300 + ".png"},
                    {"uri": "http://example.invalid/a.png"},
                    {"base64": base64.b64encode(b"not an image").decode()},
                    {"base64": "***"},
                ]
            )
        )
        value = _json(
            {
                "schema_version": 1,
                "request_id": request_id,
                "task": "erase_text",
                "params": {"source": source, "engine": "classical"},
            }
        )
    elif kind == 10:  # a prompt longer than the model takes
        value = _json(_request(request_id, prompt="a very long mug " * 120))
    else:  # odd headers beside a valid request
        value = _json(_request(request_id, prompt="a cup"))
        names = st.text(min_size=1, max_size=20).filter(lambda n: n.isprintable())
        headers = draw(st.lists(st.tuples(names, st.binary(max_size=50)), max_size=4))
        return Record(value, headers, raw_header_name=draw(st.booleans()))
    return Record(value)


@st.composite
def streams(draw: st.DrawFn) -> list[Record]:
    return [draw(hostile(index)) for index in range(draw(st.integers(20, 40)))]


@pytest.mark.parametrize("codec", CODECS)
@settings(
    max_examples=2,
    phases=[Phase.explicit, Phase.generate],  # a failing stream is read from the log, not shrunk
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(records=streams())
def test_no_record_stops_the_stream(
    settings: Settings, codec: str | None, records: list[Record]
) -> None:
    asyncio.run(_serve(settings, codec, records))


async def _serve(base: Settings, codec: str | None, records: list[Record]) -> None:
    suffix = f"-{codec or 'none'}-{uuid.uuid4().hex[:8]}"
    settings = base.replace(
        requests_topic=base.kafka.requests_topic + suffix,
        results_topic=base.kafka.results_topic + suffix,
        dlq_topic=base.kafka.dlq_topic + suffix,
        group_id=base.kafka.group_id + suffix,
        topic_partitions=1,
        max_message_bytes=MAX_BYTES,
        batch_window_ms=20,
    )
    io = KafkaIO(settings)
    await io.start()
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka.bootstrap_servers,
        compression_type=codec,
        max_request_size=4 * MAX_BYTES,
    )
    plain = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers)
    await producer.start()
    await plain.start()
    try:
        async with running_worker(settings) as worker:
            for record in records:
                if record.raw_header_name:
                    assert record.value is not None
                    topic = settings.kafka.requests_topic
                    await send_with_raw_header_name(plain, topic, 0, b"hostile", record.value)
                    continue
                await producer.send_and_wait(
                    settings.kafka.requests_topic,
                    record.value,
                    key=b"hostile",
                    partition=0,
                    headers=record.headers,
                )
            results = await io.results(len(records), timeout_s=180)
            deadline = asyncio.get_running_loop().time() + 60
            while (await io.committed()).get(0) != len(records):
                assert asyncio.get_running_loop().time() < deadline, await io.committed()
                await asyncio.sleep(0.2)
            assert worker.ready.is_set()  # still serving: it never exited
        assert len(results) == len(records), "every record gets exactly one result"
        refused = [r for r in results if r["status"] != "succeeded"]
        assert all(r["error"]["code"] != "internal" for r in refused), refused
        # Every record that is not a request at all is dead-lettered too.
        malformed = [r for r in refused if r["error"]["code"] in NOT_A_REQUEST]
        await io.read(settings.kafka.dlq_topic, len(malformed), timeout_s=30)
    finally:
        await producer.stop()
        await plain.stop()
        await io.stop()
