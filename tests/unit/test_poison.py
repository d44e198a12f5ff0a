"""Poison messages: whatever bytes arrive, parsing either yields a request or a clear,
answerable refusal; it never raises anything else (which would stop the partition)."""

from __future__ import annotations

import json
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
    document = json.loads(json.dumps(VALID))
    document["task"] = task
    if task == "erase_text":
        document["params"] = {"source": {"uri": "s3://bucket/a.png"}}
    target = document
    for key in path[:-1]:
        target = target[key]
    if delete:
        target.pop(path[-1], None)
    else:
        target[path[-1]] = value
    _check(json.dumps(document).encode())


def test_huge_messages_and_tombstones_are_refused_before_parsing() -> None:
    huge = json.dumps({**VALID, "params": {"prompt": "x" * MAX_BYTES}}).encode()
    for raw in (huge, None, b"", b"\xff\xfe", b"[]", b'"text"'):
        _check(raw)
