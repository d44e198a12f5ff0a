"""Reading an ``erase_text`` source image safely.

A source is an object-storage URI the worker may read (``file://`` under the storage root,
or ``s3://`` under ``ZIMAGE_SOURCE_PREFIXES``, by default the configured bucket) or base64
bytes. Every source is checked before it is decoded: size limit, decompression-bomb guard
(pixel limit), EXIF orientation applied, and the mode normalised to RGB or RGBA (palette,
CMYK, 16-bit and grey inputs included) so the rest of the pipeline sees one of two
layouts."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import errno
import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import (
    SourceForbiddenError,
    SourceNotFoundError,
    SourceTooLargeError,
    SourceUnreadableError,
    StorageUnavailableError,
    ZImageError,
)
from ..schemas import ImageSource
from ..storage import Storage

MAX_SOURCE_BYTES = 10 * 1024 * 1024
MAX_SOURCE_PIXELS = 40_000_000  # about 6300 x 6300
#: why a path names no file: the request's fault, answered ``source_not_found``
_NO_SUCH_FILE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.EISDIR})
#: the worker's own trouble (out of file handles, memory, a failing disk): retriable
_WORKER_TROUBLE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EIO})


@dataclass(frozen=True)
class SourceImage:
    """A decoded source: RGB or RGBA pixels, and what the output should keep."""

    image: Image.Image
    has_alpha: bool
    data: bytes

    @property
    def pixels(self) -> np.ndarray:
        return np.asarray(self.image.convert("RGB"))


async def fetch_source(source: ImageSource, storage: Storage) -> bytes:
    """A source's bytes, not decoded yet, raising the contract's ``source_*`` errors."""
    if source.base64 is not None:
        return _decode_base64(source.base64)
    assert source.uri is not None
    return await _read_uri(source.uri, storage)


async def read_source(source: ImageSource, storage: Storage) -> SourceImage:
    """Fetch and decode a source, raising the contract's ``source_*`` errors."""
    return decode_image(await fetch_source(source, storage))


def source_pixels(data: bytes) -> int:
    """How many pixels ``data`` decodes to, read from its header alone (cheap, so it can
    be asked before decoding); the most a source may have when the header does not say
    (decoding then raises the source's own error)."""
    with contextlib.suppress(Exception), Image.open(io.BytesIO(data)) as image:
        return min(image.width * image.height, MAX_SOURCE_PIXELS)
    return MAX_SOURCE_PIXELS


def decode_image(data: bytes, max_pixels: int = MAX_SOURCE_PIXELS) -> SourceImage:
    if len(data) > MAX_SOURCE_BYTES:
        raise SourceTooLargeError(f"source is {len(data)} bytes; the limit is {MAX_SOURCE_BYTES}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:
                raise SourceTooLargeError(
                    f"source is {image.width}x{image.height} pixels; the limit is {max_pixels}"
                )
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SourceTooLargeError(f"source has too many pixels: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise SourceUnreadableError(f"source is not a readable image: {exc}") from None
    return SourceImage(*_normalise(image), data=data)


def _normalise(image: Image.Image) -> tuple[Image.Image, bool]:
    image = ImageOps.exif_transpose(image) or image
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey: scale to 8 bits instead of clipping everything above 255 to white.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255, 0, 255).astype(np.uint8))
    return image.convert("RGBA" if has_alpha else "RGB"), has_alpha


def _decode_base64(text: str) -> bytes:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SourceUnreadableError(f"source.base64 is not valid base64: {exc}") from None
    if len(data) > MAX_SOURCE_BYTES:
        raise SourceTooLargeError(f"source is {len(data)} bytes; the limit is {MAX_SOURCE_BYTES}")
    return data


async def _read_uri(uri: str, storage: Storage) -> bytes:
    try:
        parsed = urlparse(uri)
    except ValueError as exc:
        raise SourceUnreadableError(f"source uri is not a valid URI: {exc}") from None
    if parsed.scheme == "file":
        if storage.root is None:
            raise SourceForbiddenError("file:// sources need file storage (ZIMAGE_STORAGE_URL)")
        return await asyncio.to_thread(_read_file, Path(unquote(parsed.path)), storage.root)
    if parsed.scheme != "s3":
        raise SourceForbiddenError(
            f"source uri scheme {parsed.scheme or '(none)'!r} is not allowed; use s3:// or "
            "file:// under the storage root"
        )
    if not storage.may_read(uri):
        allowed = ", ".join(storage.readable)
        raise SourceForbiddenError(
            f"{uri} may not be read: sources must be under {allowed} (ZIMAGE_SOURCE_PREFIXES)"
        )
    try:
        return await storage.get(uri)
    except FileNotFoundError:
        raise SourceNotFoundError(f"{uri} does not exist") from None


def _read_file(path: Path, root: Path) -> bytes:
    """The bytes of a file under ``root``. Every way the path can fail to name a readable
    file is a ``source_*`` error, and no message names the root itself."""
    shown = _relative(path, root)
    try:
        # realpath follows symlinks (a link out of the root is refused too) and, unlike
        # Path.resolve on Python 3.11, leaves a symlink loop to fail below as ELOOP.
        resolved = Path(os.path.realpath(path))
        if not resolved.is_relative_to(os.path.realpath(root)):
            raise SourceForbiddenError(f"{shown} is outside the storage root")
        info = resolved.stat()
        if not stat.S_ISREG(info.st_mode):
            raise SourceNotFoundError(f"{shown} is not a file")
        if info.st_size > MAX_SOURCE_BYTES:
            size = info.st_size
            raise SourceTooLargeError(f"source is {size} bytes; the limit is {MAX_SOURCE_BYTES}")
        return resolved.read_bytes()
    except (OSError, ValueError) as exc:
        raise _file_error(exc, shown) from None


def _file_error(exc: OSError | ValueError, shown: str) -> ZImageError:
    if not isinstance(exc, OSError):  # an embedded NUL: no file has such a name
        return SourceNotFoundError(f"{shown} names no file: {exc}")
    reason = exc.strerror or type(exc).__name__  # not str(exc): it holds the absolute path
    if exc.errno in _NO_SUCH_FILE:
        return SourceNotFoundError(f"{shown} does not exist ({reason})")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return SourceForbiddenError(f"{shown} may not be read ({reason})")
    if exc.errno in _WORKER_TROUBLE:
        return StorageUnavailableError(f"{shown} could not be read here: {reason}")
    return SourceUnreadableError(f"{shown} cannot be read ({reason})")


def _relative(path: Path, root: Path) -> str:
    """How a message names a source path: relative to the root, never with the root, and
    quoted so that a control character in it (a NUL) shows as an escape."""
    try:
        return repr(str(path.relative_to(root)))
    except ValueError:
        return "the source path"
