"""Poison messages: whatever bytes arrive, parsing either yields a request or a clear,
answerable refusal; it never raises anything else (which would stop the partition)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zimage_stream.errors import ERROR_CODES
from zimage_stream.schemas import (
    EraseTextRequest,
    GenerateRequest,
    RequestParseError,
    ResultEvent,
    parse_request,
)

MAX_BYTES = 64 * 1024
VALID: dict[str, Any] = {
    "schema_version": 1,
    "request_id": "req-0001",
    "task": "generate",
    "params": {"prompt": "a ceramic mug", "num_images": 2, "width": 256, "height": 256},
}
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
field_paths = st.sampled_from(
    [
        ("schema_version",),
        ("request_id",),
        ("task",),
        ("timeout_s",),
        ("params",),
        ("params", "prompt"),
        ("params", "num_images"),
        ("params", "width"),
        ("params", "seed"),
        ("params", "style"),
        ("params", "source"),
        ("unknown_field",),
    ]
)


def _request(task: str, path: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A valid request for ``task``, and the object that holds the field at ``path``."""
    document = json.loads(json.dumps(VALID))
    document["task"] = task
    if task == "erase_text":
        document["params"] = {"source": {"uri": "s3://bucket/a.png"}}
    target = document
    for key in path[:-1]:
        target = target.setdefault(key, {})
    return document, target


def _check(raw: bytes | None) -> None:
    try:
        request = parse_request(raw, MAX_BYTES)
    except RequestParseError as exc:
        error = exc.error
        assert error.code in ERROR_CODES and error.status == "rejected" and error.message
        # The refusal can always be published as a result event.
        ResultEvent(
            request_id=exc.request_id,
            task=exc.task,
            status="rejected",
            error=error.to_dict(),
            timings_ms={"queued": 0, "inference": 0, "total": 0},
        )
        return
    assert isinstance(request, GenerateRequest | EraseTextRequest)
    request.arrived_at(0)  # queue times are measured from here, whatever the date


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_bytes_are_refused_cleanly(raw: bytes) -> None:
    _check(raw)


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_random_json_is_refused_cleanly(value: Any) -> None:
    _check(json.dumps(value).encode())


@settings(max_examples=3000, suppress_health_check=[HealthCheck.too_slow])
@given(field_paths, json_values, st.booleans(), st.sampled_from(["generate", "erase_text"]))
def test_mutated_requests_are_parsed_or_refused_cleanly(
    path: tuple[str, ...], value: Any, delete: bool, task: str
) -> None:
    document, target = _request(task, path)
    if delete:
        target.pop(path[-1], None)
    else:
        target[path[-1]] = value
    _check(json.dumps(document).encode())


def test_huge_messages_and_tombstones_are_refused_before_parsing() -> None:
    huge = json.dumps({**VALID, "params": {"prompt": "x" * MAX_BYTES}}).encode()
    for raw in (huge, None, b"", b"\xff\xfe", b"[]", b'"text"'):
        _check(raw)


# Hostile fragments: what Python's own parser chokes on (integers past its int-string
# limit, nesting past its recursion limit), byte-order marks, lone surrogates, and dates
# at the ends of the calendar.
_SLOT = '"__slot__"'
huge_integers = st.integers(min_value=1, max_value=20_000).map(lambda n: "-" * (n % 2) + "9" * n)
deep_nesting = st.tuples(st.integers(min_value=1, max_value=20_000), st.booleans()).map(
    lambda t: ("[" * t[0] + "]" * t[0]) if t[1] else ('{"a":' * t[0] + "0" + "}" * t[0])
)
surrogates = st.integers(min_value=0xD800, max_value=0xDFFF).map(lambda c: f'"x\\u{c:04x}y"')
odd_times = st.sampled_from(
    [
        "0001-01-01T00:00:00",
        "0001-01-01T00:00:00-14:00",
        "9999-12-31T23:59:59",
        "9999-12-31T23:59:59+14:00",
        "9999-12-31T23:59:59-23:59",
        "1970-01-01T00:00:00Z",
        "-1",
    ]
) | st.datetimes(
    min_value=datetime(1, 1, 1),
    max_value=datetime(9999, 12, 31, 23, 59, 59),
    timezones=st.none()
    | st.integers(min_value=-14 * 60, max_value=14 * 60).map(
        lambda m: timezone(timedelta(minutes=m))
    ),
).map(datetime.isoformat)
fragments = (
    huge_integers
    | deep_nesting
    | surrogates
    | odd_times.map(json.dumps)
    | st.sampled_from(["1.0", "true", "false", "1e999", "-0", "NaN", "Infinity"])
)
slots = st.sampled_from(
    [
        ("schema_version",),
        ("submitted_at",),
        ("submitted_at",),
        ("timeout_s",),
        ("params",),
        ("params", "prompt"),
        ("params", "seed"),
        ("params", "width"),
        ("params", "source"),
        ("params", "source", "uri"),
        ("unknown_field",),
    ]
)
encodings = st.sampled_from(["plain", "utf-8-bom", "utf-16", "surrogatepass"])


def _encode(text: str, encoding: str) -> bytes:
    if encoding == "plain":
        return text.encode()
    if encoding == "utf-8-bom":
        return text.encode("utf-8-sig")
    if encoding == "utf-16":
        return text.encode("utf-16")
    # a surrogate written as raw bytes: not UTF-8, though Python's json decodes it
    return text.replace('"__raw__"', '"\ud800"').encode("utf-8", "surrogatepass")


@settings(max_examples=800, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(slots, fragments, encodings, st.sampled_from(["generate", "erase_text"]))
def test_hostile_fragments_are_parsed_or_refused_cleanly(
    path: tuple[str, ...], fragment: str, encoding: str, task: str
) -> None:
    document, target = _request(task, path)
    target[path[-1]] = "__slot__"
    if encoding == "surrogatepass":
        document["request_id"] = "__raw__"
    _check(_encode(json.dumps(document).replace(_SLOT, fragment), encoding))


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(odd_times)
def test_odd_submission_times_give_an_arrival_time(submitted_at: str) -> None:
    _check(json.dumps({**VALID, "submitted_at": submitted_at}).encode())
