"""The AsyncAPI document agrees with the pydantic models: the committed copy is what the
models generate, every reference resolves, and real events validate against it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from zimage_stream.asyncapi import asyncapi_document
from zimage_stream.errors import InferenceTimeoutError
from zimage_stream.schemas import ResultEvent
from zimage_stream.settings import Settings

DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.json"


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [
            r for v in node.values() for r in _refs(v)
        ]
    if isinstance(node, list):
        return [r for item in node for r in _refs(item)]
    return []


def _validator(document: dict, name: str) -> jsonschema.Validator:
    root = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    return jsonschema.Draft202012Validator(root)


def test_the_committed_document_is_what_the_models_generate() -> None:
    committed = json.loads(DOCUMENT.read_text())
    assert committed == asyncapi_document(), (
        "docs/asyncapi.json is stale: zimage-stream schema --asyncapi > docs/asyncapi.json"
    )


def test_every_reference_resolves_and_channels_are_the_default_topics() -> None:
    document = asyncapi_document()
    assert document["asyncapi"].startswith("3.")
    for ref in _refs(document):
        node: Any = document
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        assert node, ref
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    addresses = {c["address"] for c in document["channels"].values()}
    kafka = defaults.kafka
    topics = {kafka.requests_topic, kafka.results_topic, kafka.dlq_topic}
    assert addresses == topics | {None}  # None: the progress topic is off by default


def test_events_validate_against_the_document() -> None:
    document = asyncapi_document()
    requests, results = _validator(document, "RequestEvent"), _validator(document, "ResultEvent")
    requests.validate(
        {
            "schema_version": 1,
            "request_id": "r-1",
            "task": "generate",
            "params": {"prompt": "a mug", "style": "festive", "num_images": 2},
        }
    )
    requests.validate(
        {
            "schema_version": 1,
            "request_id": "r-2",
            "task": "erase_text",
            "params": {"source": {"uri": "s3://bucket/a.png"}, "engine": "classical"},
        }
    )
    with pytest.raises(jsonschema.ValidationError):
        requests.validate({"schema_version": 1, "request_id": "r-3", "task": "generate"})
    with pytest.raises(jsonschema.ValidationError):
        requests.validate({**_generate(), "params": {"prompt": "a mug", "num_images": 9}})
    timed_out = ResultEvent(
        request_id="r-1",
        task="generate",
        status="timed_out",
        error=InferenceTimeoutError("over budget").to_dict(),
        timings_ms={"queued": 1, "inference": 30000, "total": 30001},
    )
    results.validate(json.loads(timed_out.model_dump_json()))


def _generate() -> dict:
    return {"schema_version": 1, "request_id": "r-4", "task": "generate"}
