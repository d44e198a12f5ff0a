"""S3 storage against a local moto server: the same obstore client production uses."""

from __future__ import annotations

import asyncio
import hashlib
import io
import time

import boto3
import pytest
from PIL import Image
from structlog.testing import capture_logs

from tests.integration.conftest import KafkaIO, generate
from zimage_stream.errors import StorageUnavailableError
from zimage_stream.settings import Settings, StorageSettings
from zimage_stream.storage import WRITE_ATTEMPTS, Storage
from zimage_stream.testing import running_worker

CREDENTIALS = {
    "s3_region": "us-east-1",
    "s3_access_key_id": "testing",
    "s3_secret_access_key": "testing",
}


def _client(endpoint: str):  # type: ignore[no-untyped-def]
    """A second, independent S3 client (boto3) to check what obstore wrote."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def _bucket(endpoint: str, name: str) -> None:
    _client(endpoint).create_bucket(Bucket=name)


def _storage(endpoint: str, bucket: str, prefix: str = "", **settings: str) -> Storage:
    """A new bucket, and this project's storage over it."""
    _bucket(endpoint, bucket)
    url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    return Storage.from_settings(
        StorageSettings(url=url, s3_endpoint_url=endpoint, **CREDENTIALS, **settings)
    )


def _object(endpoint: str, bucket: str, key: str) -> bytes:
    return _client(endpoint).get_object(Bucket=bucket, Key=key)["Body"].read()


async def test_s3_round_trip(s3_endpoint: str, unique: str) -> None:
    bucket = f"images-{unique}"
    storage = _storage(s3_endpoint, bucket, "renders")
    data = b"\x89PNG fake image bytes"
    stored = await storage.put_image(data, "png")
    sha = hashlib.sha256(data).hexdigest()
    # The URL's prefix is the images' folder: no second "images/" below it.
    assert stored.uri == f"s3://{bucket}/renders/{sha[:2]}/{sha}.png"
    assert stored.sha256 == sha and stored.size_bytes == len(data)
    # Really in S3, under the prefix, as read by another client, with its content type.
    assert _object(s3_endpoint, bucket, f"renders/{sha[:2]}/{sha}.png") == data
    head = _client(s3_endpoint).head_object(Bucket=bucket, Key=f"renders/{sha[:2]}/{sha}.png")
    assert head["ContentType"] == "image/png"
    assert await storage.get(stored.uri) == data
    assert await storage.exists(stored.uri)
    again = await storage.put_image(data, "png")
    assert again == stored


async def test_a_storage_url_named_images_is_not_doubled(s3_endpoint: str, unique: str) -> None:
    storage = _storage(s3_endpoint, f"named-{unique}", "images")
    stored = await storage.put_image(b"webp bytes", "webp")
    assert stored.uri == f"s3://named-{unique}/images/{stored.sha256[:2]}/{stored.sha256}.webp"
    key = stored.uri.removeprefix(f"s3://named-{unique}/")
    head = _client(s3_endpoint).head_object(Bucket=f"named-{unique}", Key=key)
    assert head["ContentType"] == "image/webp"


async def _erase_source_error(storage: Storage, uri: str) -> Exception:
    from zimage_stream.erase import read_source
    from zimage_stream.schemas import ImageSource

    with pytest.raises(Exception) as info:
        await read_source(ImageSource(uri=uri), storage)
    return info.value


async def test_sources_are_read_anywhere_in_the_bucket_by_default(
    s3_endpoint: str, unique: str
) -> None:
    from zimage_stream.erase import fetch_source
    from zimage_stream.schemas import ImageSource

    bucket = f"uploads-{unique}"
    storage = _storage(s3_endpoint, bucket, "images")
    _client(s3_endpoint).put_object(Bucket=bucket, Key="uploads/in.png", Body=b"source")
    source = ImageSource(uri=f"s3://{bucket}/uploads/in.png")
    assert await fetch_source(source, storage) == b"source"
    error = await _erase_source_error(storage, f"s3://other-{unique}/uploads/in.png")
    assert getattr(error, "code", None) == "source_forbidden"
    assert f"s3://{bucket}/" in str(error)  # the message names what is allowed


async def test_source_prefixes_limit_what_erase_text_may_read(
    s3_endpoint: str, unique: str
) -> None:
    bucket = f"limited-{unique}"
    allowed = f"s3://{bucket}/uploads, s3://{bucket}/inbox/"
    storage = _storage(s3_endpoint, bucket, "images", source_prefixes=allowed)
    client = _client(s3_endpoint)
    client.put_object(Bucket=bucket, Key="uploads/in.png", Body=b"not an image")
    client.put_object(Bucket=bucket, Key="private/secret.png", Body=b"not an image")
    readable = await _erase_source_error(storage, f"s3://{bucket}/uploads/in.png")
    assert getattr(readable, "code", None) == "source_unreadable"  # read, then not decoded
    for outside in (
        f"s3://{bucket}/private/secret.png",
        f"s3://{bucket}/uploads/../private/secret.png",
        f"s3://{bucket}/uploads-not/x.png",
    ):
        error = await _erase_source_error(storage, outside)
        assert getattr(error, "code", None) == "source_forbidden", outside
        assert f"s3://{bucket}/uploads/, s3://{bucket}/inbox/" in str(error)
    with pytest.raises(ValueError, match="not in the configured bucket"):
        _storage(s3_endpoint, f"other-{unique}", source_prefixes=f"s3://{bucket}/uploads")


async def test_missing_bucket_is_storage_unavailable(s3_endpoint: str, unique: str) -> None:
    storage = Storage.from_settings(
        StorageSettings(url=f"s3://missing-{unique}", s3_endpoint_url=s3_endpoint, **CREDENTIALS)
    )
    with pytest.raises(StorageUnavailableError) as info:
        await storage.put_image(b"x", "png")
    assert info.value.retriable and info.value.code == "storage_unavailable"
    assert storage.errors["write"] == WRITE_ATTEMPTS  # each failed attempt is counted


async def test_worker_stores_images_in_s3(
    settings: Settings, kafka_io: KafkaIO, s3_endpoint: str, unique: str
) -> None:
    bucket = f"worker-{unique}"
    _bucket(s3_endpoint, bucket)
    settings = settings.replace(
        storage_url=f"s3://{bucket}", s3_endpoint_url=s3_endpoint, **CREDENTIALS
    )
    async with running_worker(settings):
        await kafka_io.send(generate("s3-1", num_images=2, style="studio_gradient"))
        (result,) = await kafka_io.results(1)
    assert result["status"] == "succeeded"
    for ref in result["images"]:
        assert ref["uri"].startswith(f"s3://{bucket}/images/")
        body = _object(s3_endpoint, bucket, ref["uri"].removeprefix(f"s3://{bucket}/"))
        assert hashlib.sha256(body).hexdigest() == ref["sha256"]
        with Image.open(io.BytesIO(body)) as image:
            assert image.size == (256, 256)


async def test_missing_s3_objects_read_as_not_found(s3_endpoint: str, unique: str) -> None:
    from zimage_stream.erase import read_source
    from zimage_stream.schemas import ImageSource

    bucket = f"sources-{unique}"
    storage = _storage(s3_endpoint, bucket)
    missing = f"s3://{bucket}/uploads/nope.png"
    assert not await storage.exists(missing)
    with pytest.raises(FileNotFoundError):
        await storage.get(missing)
    with pytest.raises(Exception) as info:
        await read_source(ImageSource(uri=missing), storage)
    assert getattr(info.value, "code", None) == "source_not_found"


async def test_a_storage_outage_is_retried_with_backoff_then_reported(unique: str) -> None:
    from moto.server import ThreadedMotoServer

    from zimage_stream.broker import free_port

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    storage = _storage(endpoint, f"outage-{unique}")
    server.stop()  # S3 goes away
    with capture_logs() as logs:
        started = time.monotonic()
        with pytest.raises(StorageUnavailableError) as info:
            await storage.put_image(b"lost while down", "png")
        waited = time.monotonic() - started
    retries = [e for e in logs if e["event"] == "storage_write_retry"]
    assert [e["attempt"] for e in retries] == [1, 2, 3]
    assert waited >= 0.25 + 0.5 + 1.0  # the backoff doubles
    assert info.value.retriable and "after 4 attempts" in info.value.message

    # S3 comes back while a write is being retried: the write lands.
    async def come_back() -> None:
        await asyncio.sleep(0.4)
        server.start()
        _bucket(endpoint, f"outage-{unique}")  # harmless if moto kept it

    try:
        back = asyncio.create_task(come_back())
        stored = await storage.put_image(b"stored after the outage", "png")
        await back
        key = stored.uri.removeprefix(f"s3://outage-{unique}/")
        assert _object(endpoint, f"outage-{unique}", key) == b"stored after the outage"
    finally:
        server.stop()
