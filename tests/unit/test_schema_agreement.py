"""The published request schema and the worker agree: what the schema (``zimage-stream
schema`` and the AsyncAPI document) validates, the worker accepts, and what the worker
refuses as invalid, the schema refuses. Subscribers generate code from these schemas.

Requests are drawn from the schema itself (``tests/support/schema_documents``), and from a loosened
copy of it with every bound, pattern and choice taken out, so that documents on both sides
of each rule are tried.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings

from tests.support.schema_documents import documents
from zimage_stream.asyncapi import asyncapi_document
from zimage_stream.schemas import RequestParseError, json_schemas, parse_request

LIMIT = 1 << 24
REQUEST = json_schemas()["request"]
# Constraints the loosened copy drops (types and field names stay).
_RULES = {"minimum", "maximum", "multipleOf", "minLength", "maxLength", "minItems", "pattern"}


def _ecma_pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Any:
    """``pattern`` as JSON Schema (ECMA 262) reads it: ``$`` is the end of the text. Python's
    ``re`` also lets ``$`` match before a final newline, which no other implementation does."""
    if isinstance(instance, str) and not re.search(pattern.replace("$", r"\Z"), instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"pattern": _ecma_pattern}
)
_FORMATS = jsonschema.Draft202012Validator.FORMAT_CHECKER


def _validators() -> list[jsonschema.Validator]:
    components = asyncapi_document()["components"]
    asyncapi = {"$ref": "#/components/schemas/RequestEvent", "components": components}
    return [
        _Validator(REQUEST, format_checker=_FORMATS),
        _Validator(asyncapi, format_checker=_FORMATS),
    ]


VALIDATORS = _validators()


def _schema_accepts(document: Any) -> bool:
    verdicts = {v.is_valid(document) for v in VALIDATORS}
    assert len(verdicts) == 1, "the JSON Schema and the AsyncAPI document disagree"
    return verdicts.pop()


def _worker_accepts(document: Any) -> bool:
    try:
        parse_request(json.dumps(document).encode(), LIMIT)
    except RequestParseError as exc:
        assert exc.error.code in ("invalid_request", "unsupported_schema_version"), exc.error
        return False
    return True


def _loosened(node: Any) -> Any:
    """``node`` with each constrained part made "either as the schema says (three times in
    four) or with its rules taken out", so that most drawn documents break one rule or none."""
    if isinstance(node, list):
        return [_loosened(item) for item in node]
    if not isinstance(node, dict):
        return node
    strict = {k: _nested(k, v) for k, v in node.items()}
    loose = {k: v for k, v in strict.items() if k not in _RULES}
    if "oneOf" in loose and "discriminator" not in loose:
        del loose["oneOf"]  # ImageSource's "exactly one of uri or base64"
    for key in ("const", "enum"):
        loose.pop(key, None)  # any task, style, engine, language or schema_version
    if loose.get("type") == "object":
        loose.pop("required", None)
        loose.pop("additionalProperties", None)  # unknown fields too
    if loose == strict or "$defs" in strict:
        return strict
    return {"anyOf": [strict, strict, strict, loose]}


def _nested(keyword: str, value: Any) -> Any:
    if keyword in ("$defs", "properties"):  # name -> schema
        return {name: _loosened(schema) for name, schema in value.items()}
    if keyword in ("items", "anyOf", "oneOf"):
        return _loosened(value)
    return value


_FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FAST
@given(documents(REQUEST))
def test_every_request_the_schema_generates_is_accepted(document: dict) -> None:
    if not _schema_accepts(document):  # only the ``$`` newline (see _ecma_pattern)
        return
    assert _worker_accepts(document), json.dumps(document)[:500]


@_FAST
@given(documents(_loosened(copy.deepcopy(REQUEST))))
def test_the_schema_and_the_worker_agree_on_any_request_shaped_document(document: Any) -> None:
    assert _schema_accepts(document) == _worker_accepts(document), json.dumps(document)[:500]


def _generate(**params: Any) -> dict:
    return {
        "schema_version": 1,
        "request_id": "r-1",
        "task": "generate",
        "params": {"prompt": "a mug", **params},
    }


def _erase(source: dict) -> dict:
    return {
        "schema_version": 1,
        "request_id": "r-1",
        "task": "erase_text",
        "params": {"source": source},
    }


@pytest.mark.parametrize(
    "document",
    [
        _generate(width=300),
        _generate(height=1000),
        _generate(width=4096),
        _generate(num_images=9),
        _generate(seed=-1),
        _generate(num_inference_steps=51),
        _generate(guidance_scale=20.5),
        _generate(num_image=2),
        _generate(width=512.5),
        {**_generate(), "request_id": "has space"},
        {**_generate(), "request_id": "r-1\n"},
        {**_generate(), "timeout_s": 0.5},
        {**_generate(), "schema_version": True},
        _erase({}),
        _erase({"uri": "s3://b/k.png", "base64": "AAAA"}),
        _erase({"uri": None, "base64": "AAAA"}),
        _erase({"uri": ""}),
    ],
)
def test_what_the_worker_refuses_the_schema_refuses(document: dict) -> None:
    assert not _worker_accepts(document)
    assert not _schema_accepts(document)


@pytest.mark.parametrize(
    "document",
    [
        _generate(width=512, height=768.0),
        {**_generate(), "schema_version": 1.0},
        _erase({"uri": "s3://b/k.png"}),
        _erase({"base64": "AAAA"}),
    ],
)
def test_what_the_schema_accepts_the_worker_accepts(document: dict) -> None:
    assert _schema_accepts(document)
    assert _worker_accepts(document)


@pytest.mark.parametrize(
    "submitted_at",
    [
        "2024-01-01T00:00:00Z",
        "2024-01-01t00:00:00z",
        "2024-01-01T00:00:00.123456789Z",
        "2024-01-01T00:00:00-00:00",
        "0001-01-01T00:00:00-14:00",
        "2024-01-01T00:00:00",  # no offset: it would be read as the worker's local time
        "2024-01-01 00:00:00Z",
        "2024-01-01T00:00Z",
        "2024-01-01T00:00:00+0100",
        "2024-01-01T00:00:00,5Z",
        "2024-01-01T00:00:00+01:60",
        "2024-02-30T00:00:00Z",
        "2024-01-01",
    ],
)
def test_submission_times_are_read_as_the_schema_reads_date_time(submitted_at: str) -> None:
    document = {**_generate(), "submitted_at": submitted_at}
    assert _worker_accepts(document) == _schema_accepts(document)
