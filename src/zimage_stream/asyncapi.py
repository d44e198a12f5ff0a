"""The AsyncAPI 3 document of the topics, generated from the pydantic models
(``zimage-stream schema --asyncapi``; the committed copy is ``docs/asyncapi.json``, and a
test keeps the two equal)."""

from __future__ import annotations

import copy
from typing import Any

from . import __version__
from .schemas import ProgressEvent, json_schemas
from .settings import KafkaSettings

_KEY = {"type": "string", "description": "the request_id (results: the request's key)"}


def asyncapi_document(settings: KafkaSettings | None = None) -> dict[str, Any]:
    settings = settings or KafkaSettings()
    schemas = json_schemas()
    request, result = copy.deepcopy(schemas["request"]), copy.deepcopy(schemas["result"])
    progress = ProgressEvent.model_json_schema()
    components: dict[str, Any] = {}
    for schema in (request, result, progress):
        # Hoist pydantic's local definitions to components, and point references there.
        components.update(schema.pop("$defs", {}))
    components["RequestEvent"] = request
    components["ResultEvent"] = result
    components["ProgressEvent"] = progress
    components = _rebase(components)
    replay_headers = {
        "type": "object",
        "properties": {
            "traceparent": {
                "type": "string",
                "description": "W3C trace context, copied to the result",
            },
            "replay": {
                "type": "string",
                "const": "1",
                "description": "set by zimage-stream replay",
            },
            "replay-force": {
                "type": "string",
                "const": "1",
                "description": "replay --force: compute again, skip the cache",
            },
        },
    }
    dead_letter_headers = {
        "type": "object",
        "required": [
            "error.code",
            "error.message",
            "source.topic",
            "source.partition",
            "source.offset",
        ],
        "properties": {
            "error.code": {"type": "string"},
            "error.message": {"type": "string"},
            "source.topic": {"type": "string"},
            "source.partition": {"type": "string"},
            "source.offset": {"type": "string"},
            "attempts": {
                "type": "string",
                "description": (
                    "poison_request only: how many times the engine (or the worker) died "
                    "with the request inside"
                ),
            },
            "value.truncated": {
                "type": "string",
                "description": (
                    "present when the record was larger than ZIMAGE_MAX_MESSAGE_BYTES: the "
                    "copy holds its first bytes and this header its original length"
                ),
            },
        },
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "zimage-stream",
            "version": __version__,
            "description": (
                "Image requests in, result events out (see docs/CONTRACT.md). "
                "At-least-once: a request may be answered more than once, identically."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "kafka": {"host": settings.bootstrap_servers, "protocol": "kafka"},
        },
        "channels": {
            "requests": {
                "address": settings.requests_topic,
                "messages": {"request": {"$ref": "#/components/messages/Request"}},
            },
            "results": {
                "address": settings.results_topic,
                "messages": {"result": {"$ref": "#/components/messages/Result"}},
            },
            "progress": {
                # null: the topic is optional and named by ZIMAGE_PROGRESS_TOPIC
                "address": settings.progress_topic or None,
                "messages": {"progress": {"$ref": "#/components/messages/Progress"}},
            },
            "deadLetters": {
                "address": settings.dlq_topic,
                "messages": {"deadLetter": {"$ref": "#/components/messages/DeadLetter"}},
            },
        },
        "operations": {
            "submitRequest": {
                "action": "send",
                "channel": {"$ref": "#/channels/requests"},
                "summary": "An upstream service (or replay) publishes a request",
            },
            "receiveResult": {
                "action": "receive",
                "channel": {"$ref": "#/channels/results"},
                "summary": "Result subscribers read one event per processing attempt",
            },
            "receiveProgress": {
                "action": "receive",
                "channel": {"$ref": "#/channels/progress"},
                "summary": "Denoising steps of a request, throttled (submit --wait shows them)",
            },
            "receiveDeadLetter": {
                "action": "receive",
                "channel": {"$ref": "#/channels/deadLetters"},
                "summary": "Messages that are not valid requests, unchanged, with the reason",
            },
        },
        "components": {
            "messages": {
                "Request": {
                    "name": "Request",
                    "payload": {"$ref": "#/components/schemas/RequestEvent"},
                    "headers": replay_headers,
                    "bindings": {"kafka": {"key": _KEY}},
                },
                "Result": {
                    "name": "Result",
                    "payload": {"$ref": "#/components/schemas/ResultEvent"},
                    "bindings": {"kafka": {"key": _KEY}},
                },
                "Progress": {
                    "name": "Progress",
                    "payload": {"$ref": "#/components/schemas/ProgressEvent"},
                    "bindings": {"kafka": {"key": _KEY}},
                },
                "DeadLetter": {
                    "name": "DeadLetter",
                    "summary": "the original bytes of a message that is not a valid request",
                    "contentType": "application/octet-stream",
                    "payload": {"type": "string", "format": "binary"},
                    "headers": dead_letter_headers,
                },
            },
            "schemas": components,
        },
    }


def _rebase(node: Any) -> Any:
    """``#/$defs/X`` references become ``#/components/schemas/X``."""
    if isinstance(node, dict):
        return {
            k: (v.replace("#/$defs/", "#/components/schemas/") if k == "$ref" else _rebase(v))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_rebase(item) for item in node]
    return node
