"""Errors that become data: each carries the contract's machine ``code`` and a ``retriable`` flag.

They are raised anywhere in the worker and turned into a result event's ``error`` at one
boundary (``worker.py``), in the way aiokafka's ``KafkaError`` classes carry ``retriable``.
"""

from __future__ import annotations

from typing import ClassVar


class ZImageError(Exception):
    """Base class: a failure the worker answers with a result event."""

    code: ClassVar[str] = "internal"
    retriable: ClassVar[bool] = False
    #: status of the result event this error produces
    status: ClassVar[str] = "failed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message, "retriable": self.retriable}


class InvalidJsonError(ZImageError):
    code = "invalid_json"
    status = "rejected"


class InvalidRequestError(ZImageError):
    code = "invalid_request"
    status = "rejected"


class UnsupportedSchemaVersionError(ZImageError):
    code = "unsupported_schema_version"
    status = "rejected"


class SourceNotFoundError(ZImageError):
    code = "source_not_found"
    status = "rejected"


class SourceUnreadableError(ZImageError):
    code = "source_unreadable"
    status = "rejected"


class SourceTooLargeError(ZImageError):
    code = "source_too_large"
    status = "rejected"


class SourceForbiddenError(ZImageError):
    code = "source_forbidden"
    status = "rejected"


class InferenceTimeoutError(ZImageError):
    code = "timeout"
    retriable = True
    status = "timed_out"


class OutOfMemoryError(ZImageError):
    code = "out_of_memory"
    retriable = True


class ModelUnavailableError(ZImageError):
    code = "model_unavailable"
    retriable = True


class StorageUnavailableError(ZImageError):
    code = "storage_unavailable"
    retriable = True


class InternalError(ZImageError):
    code = "internal"
    retriable = True


class PoisonRequestError(ZImageError):
    """The request was inside the engine when it (or the worker) died as many times as the
    worker allows: it is dead-lettered and not run again."""

    code = "poison_request"

    def __init__(self, message: str, attempts: int = 0) -> None:
        super().__init__(message)
        self.attempts = attempts


_BY_CODE: dict[str, type[ZImageError]] = {
    cls.code: cls
    for cls in (
        InvalidJsonError,
        InvalidRequestError,
        UnsupportedSchemaVersionError,
        SourceNotFoundError,
        SourceUnreadableError,
        SourceTooLargeError,
        SourceForbiddenError,
        InferenceTimeoutError,
        OutOfMemoryError,
        ModelUnavailableError,
        StorageUnavailableError,
        InternalError,
        PoisonRequestError,
    )
}

ERROR_CODES: tuple[str, ...] = tuple(_BY_CODE)


def for_code(code: str) -> type[ZImageError]:
    """The error class for a contract error code (``internal`` for an unknown one)."""
    return _BY_CODE.get(code, InternalError)


def as_error(exc: Exception, doing: str) -> ZImageError:
    """``exc`` as a contract error: itself when it is one, else ``internal`` naming what
    failed (``doing``), so that one boundary can answer any failure."""
    if isinstance(exc, ZImageError):
        return exc
    return InternalError(f"{doing} failed: {exc!r}")
