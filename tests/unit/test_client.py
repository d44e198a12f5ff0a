"""The client library's pieces that need no broker: its Kafka options are the worker's,
and what ``erase`` sends for bytes, a file or a URI."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from zimage_stream.client import ZImageClient, erase_request, source_of
from zimage_stream.kafka_security import security_options
from zimage_stream.schemas import EraseTextRequest, parse_request
from zimage_stream.settings import KafkaSettings


def test_the_client_takes_the_workers_kafka_options_by_name() -> None:
    client = ZImageClient(
        "broker:9093",
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="svc",
        sasl_password="secret",
        results_topic="images.results",
    )
    assert client.settings.bootstrap_servers == "broker:9093"
    assert client.settings.results_topic == "images.results"
    assert security_options(client.settings) == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "svc",
        "sasl_plain_password": "secret",
    }
    with pytest.raises(TypeError):
        ZImageClient("broker:9093", settings=KafkaSettings())
    with pytest.raises(ValueError):
        ZImageClient("broker:9093", security_protocol="TLS")  # not a protocol Kafka knows


async def test_erase_sources_are_inline_bytes_or_uris(tmp_path: Path) -> None:
    image = tmp_path / "banner.png"
    image.write_bytes(b"\x89PNG bytes")
    inline = {"base64": base64.b64encode(b"\x89PNG bytes").decode()}
    assert await source_of(b"\x89PNG bytes") == inline
    assert await source_of(image) == inline
    assert await source_of(str(image)) == inline
    assert await source_of("s3://bucket/uploads/a.png") == {"uri": "s3://bucket/uploads/a.png"}
    request = erase_request(await source_of(image), "erase-1", ["en"], "classical")
    parsed = parse_request(json.dumps(request).encode(), 1 << 20)
    assert isinstance(parsed, EraseTextRequest) and parsed.params.engine == "classical"
