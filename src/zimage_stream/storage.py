"""Object storage for images: a local folder (``file://``, the default) or S3 (``s3://``).

Keys are content-addressed, ``<prefix>/<sha[:2]>/<sha256>.<ext>``, so reprocessing the same
request writes the same objects and a repeat write is harmless. The prefix is the one
``ZIMAGE_STORAGE_URL`` names (``s3://bucket/renders`` puts images under ``renders/``), or
``images`` when it names none (a bucket, or a local folder). S3 objects carry their
``Content-Type``.

``erase_text`` sources are read from anywhere under ``ZIMAGE_SOURCE_PREFIXES``
(comma-separated URIs in the configured bucket; by default the whole bucket).

Both backends go through ``obstore``, whose S3 client is a real one (signing, multipart),
so the S3 tests against a local moto server exercise the production code path.

A failed write is tried again with exponential backoff (``WRITE_ATTEMPTS`` in all, waits
of ``BACKOFF_S``, doubling) before the request is answered ``storage_unavailable``
(retriable). obstore's own S3 retries are off, so one policy applies to every backend
and an outage costs a request seconds, not obstore's default three minutes.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import obstore
import structlog
from obstore.exceptions import NotFoundError
from obstore.store import LocalStore, S3Store

from .errors import StorageUnavailableError
from .imaging import CONTENT_TYPES
from .schemas import ImageRef
from .settings import StorageSettings


class EncodedImageLike(Protocol):
    """An image encoded for storage (``engine.calls.EncodedImage``)."""

    @property
    def data(self) -> bytes: ...
    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...


log = structlog.get_logger(__name__)

# obstore's S3 "not found" is its own class, not a FileNotFoundError.
_NOT_FOUND = (FileNotFoundError, NotFoundError)
WRITE_ATTEMPTS = 4
BACKOFF_S = 0.25


@dataclass(frozen=True)
class StoredObject:
    """Where an object landed and what it holds."""

    uri: str
    sha256: str
    size_bytes: int


class Storage:
    """A content-addressed image store over one obstore backend.

    ``uri_prefix`` is the URI the store's keys are relative to (``s3://bucket``, or the
    local folder's ``file://`` URI); images are written under ``images_prefix`` there, and
    sources are read under ``readable`` (URI prefixes; by default everything).
    """

    def __init__(
        self,
        store: Any,
        uri_prefix: str,
        root: Path | None = None,
        attempts: int = WRITE_ATTEMPTS,
        backoff_s: float = BACKOFF_S,
        *,
        images_prefix: str = "images",
        readable: Sequence[str] = (),
        content_types: bool = False,
    ) -> None:
        self._store = store
        self._attempts, self._backoff_s = max(1, attempts), backoff_s
        self._uri_prefix = uri_prefix.rstrip("/")
        #: failed calls by operation: "write" (each failed attempt), "read"
        self.errors: Counter[str] = Counter()
        self._images_prefix = images_prefix.strip("/")
        self._content_types = content_types  # LocalStore takes no attributes
        #: URI prefixes that sources may be read from
        self.readable = tuple(readable) or (self._uri_prefix + "/",)
        #: the local folder for ``file://`` storage (None for S3)
        self.root = root

    @classmethod
    def from_settings(cls, settings: StorageSettings) -> Storage:
        url = settings.url
        parsed = urlparse(url)
        if parsed.scheme == "s3":
            return cls._s3(parsed.netloc, parsed.path.strip("/"), settings)
        if settings.source_prefixes:
            raise ValueError("ZIMAGE_SOURCE_PREFIXES applies to s3:// storage only")
        if parsed.scheme not in ("", "file"):
            raise ValueError(
                f"ZIMAGE_STORAGE_URL={url!r}: use a folder path, file:///folder or s3://bucket/prefix"
            )
        root = Path(parsed.path if parsed.scheme == "file" else url).expanduser().resolve()
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(
                f"ZIMAGE_STORAGE_URL={url!r}: cannot create the folder {root}"
                f" ({exc.strerror or exc})"
            ) from None
        return cls(LocalStore(root, mkdir=True), root.as_uri(), root)

    @classmethod
    def _s3(cls, bucket: str, prefix: str, settings: StorageSettings) -> Storage:
        if not bucket:
            raise ValueError(f"ZIMAGE_STORAGE_URL={settings.url!r} names no bucket")
        config: dict[str, Any] = {}
        if settings.s3_endpoint_url:
            config["endpoint"] = settings.s3_endpoint_url
        if settings.s3_region:
            config["region"] = settings.s3_region
        if settings.s3_access_key_id and settings.s3_secret_access_key:
            config["access_key_id"] = settings.s3_access_key_id
            config["secret_access_key"] = settings.s3_secret_access_key
        allow_http = bool(settings.s3_endpoint_url and settings.s3_endpoint_url.startswith("http:"))
        store = S3Store(
            bucket,
            client_options={"allow_http": allow_http, "timeout": "30s"},
            retry_config={"max_retries": 0},  # put_image retries, for every backend alike
            **config,
        )
        bucket_uri = f"s3://{bucket}"
        readable = _source_prefixes(settings.source_prefixes, bucket_uri)
        return cls(
            store,
            bucket_uri,
            images_prefix=prefix or "images",
            readable=readable,
            content_types=True,
        )

    @property
    def location(self) -> str:
        """Where images are written: the storage URL with its prefix."""
        return f"{self._uri_prefix}/{self._images_prefix}"

    async def check(self) -> None:
        """Raise when the storage cannot be used: a local folder that is not writable, a
        bucket that does not exist or refuses these credentials, an endpoint that is down."""
        if self.root is not None:
            if not os.access(self.root, os.W_OK | os.X_OK):
                raise PermissionError(f"{self.root} is not writable")
            return
        await obstore.list_with_delimiter_async(self._store, self._images_prefix)

    async def put_image(self, data: bytes, extension: str) -> StoredObject:
        """Store image bytes under their sha256; the same bytes always get the same URI."""
        sha = hashlib.sha256(data).hexdigest()
        key = f"{self._images_prefix}/{sha[:2]}/{sha}.{extension}"
        attributes = {"Content-Type": CONTENT_TYPES[extension]} if self._content_types else None
        for attempt in range(1, self._attempts + 1):
            try:
                await obstore.put_async(self._store, key, data, attributes=attributes)
                break
            except Exception as exc:  # obstore raises its own hierarchy; all mean "not stored"
                self.errors["write"] += 1
                if attempt == self._attempts:
                    raise StorageUnavailableError(
                        f"could not store {key} after {attempt} attempts: {exc}"
                    ) from exc
                wait = self._backoff_s * 2 ** (attempt - 1)
                log.warning(
                    "storage_write_retry",
                    key=key,
                    attempt=attempt,
                    wait_s=wait,
                    error=str(exc)[:200],
                )
                await asyncio.sleep(wait)
        return StoredObject(uri=f"{self._uri_prefix}/{key}", sha256=sha, size_bytes=len(data))

    async def put_encoded(
        self, images: Sequence[EncodedImageLike], image_format: str
    ) -> list[ImageRef]:
        """Store images already encoded in ``image_format``; their references, in order."""

        async def put_one(image: EncodedImageLike) -> ImageRef:
            stored = await self.put_image(image.data, image_format)
            return ImageRef(
                uri=stored.uri,
                width=image.width,
                height=image.height,
                content_type=CONTENT_TYPES[image_format],
                sha256=stored.sha256,
                size_bytes=stored.size_bytes,
            )

        return list(await asyncio.gather(*(put_one(image) for image in images)))

    async def get(self, uri: str) -> bytes:
        """Read an object of this storage by its URI; FileNotFoundError when there is none."""
        key = self.key_of(uri)
        try:
            result = await obstore.get_async(self._store, key)
            return bytes(await result.bytes_async())
        except _NOT_FOUND as exc:
            raise FileNotFoundError(uri) from exc
        except Exception:
            self.errors["read"] += 1
            raise

    async def exists(self, uri: str) -> bool:
        key = self.key_of(uri)
        try:
            await obstore.head_async(self._store, key)
        except _NOT_FOUND:
            return False
        except Exception:
            self.errors["read"] += 1
            raise
        return True

    def key_of(self, uri: str) -> str:
        if not uri.startswith(self._uri_prefix + "/"):
            raise ValueError(f"{uri!r} is not under this storage ({self._uri_prefix})")
        return uri[len(self._uri_prefix) + 1 :]

    def may_read(self, uri: str) -> bool:
        """Whether ``uri`` is under one of the readable prefixes, as a plain key: no empty,
        ``.`` or ``..`` segment can step out of one."""
        key = uri.partition("://")[2].partition("/")[2]
        if any(part in ("", ".", "..") for part in key.split("/")):
            return False
        return any(uri.startswith(prefix) for prefix in self.readable)


def _source_prefixes(setting: str, bucket_uri: str) -> list[str]:
    """``ZIMAGE_SOURCE_PREFIXES`` as folder URIs (ending in ``/``) in the configured bucket;
    empty: the whole bucket."""
    prefixes = [p.strip() for p in setting.split(",") if p.strip()]
    for prefix in prefixes:
        if not (prefix + "/").startswith(bucket_uri + "/"):
            raise ValueError(
                f"ZIMAGE_SOURCE_PREFIXES: {prefix!r} is not in the configured bucket "
                f"({bucket_uri}); give s3:// prefixes in it, comma-separated"
            )
    return [p.rstrip("/") + "/" for p in prefixes] or [bucket_uri + "/"]
