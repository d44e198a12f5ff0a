"""Request and result events, exactly as ``docs/CONTRACT.md`` (version 1) defines them.

``parse_request`` is the one entry point for bytes read from Kafka: it returns a validated
request or raises a :class:`~zimage_stream.errors.ZImageError` whose message says how to fix
the input, together with whatever ``request_id``/``task`` could still be read so that the
rejection can be answered.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import from_json

from .errors import (
    ERROR_CODES,
    InvalidJsonError,
    InvalidRequestError,
    UnsupportedSchemaVersionError,
    ZImageError,
)
from .styles import StyleName

SCHEMA_VERSION = 1

#: optional headers (W3C trace context; replays made by ``zimage-stream replay``)
TRACEPARENT_HEADER = "traceparent"
REPLAY_HEADER = "replay"  # "1" on replayed requests and on their results
FORCE_HEADER = "replay-force"  # "1": compute again, past the cache
#: the request headers that its result carries too
PASSED_HEADERS = (TRACEPARENT_HEADER, REPLAY_HEADER)
REQUEST_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
_REQUEST_ID_RE = re.compile(REQUEST_ID_PATTERN)
MAX_SEED = 2**32 - 1
MAX_BASE64_CHARS = (10 * 1024 * 1024 * 4) // 3 + 4


def _multiple_of_16(value: int) -> int:
    if value % 16:
        lower = value - value % 16
        raise ValueError(f"must be a multiple of 16 (got {value}; try {max(lower, 256)})")
    return value


def _whole(value: Any) -> Any:
    """A JSON number with no fraction (``1024.0``) is an integer, as JSON Schema's
    ``integer`` says; the strict models would refuse the float that JSON parsing makes."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _an_integer(value: Any) -> Any:
    # A JSON ``true`` would pass ``Literal[1]``: ``True == 1`` in Python.
    if isinstance(value, bool):
        raise ValueError(f"must be the integer {SCHEMA_VERSION} (got {json.dumps(value)})")
    return _whole(value)


Whole = BeforeValidator(_whole)

# RFC 3339's date-time, as the schema's ``format: date-time`` reads it: ``T`` between date
# and time, seconds, an offset (``Z`` or ``+hh:mm``). Pydantic alone also takes a space, no
# seconds, ``+hhmm`` and no offset at all (then read as the worker's local time).
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]([01]\d|2[0-3]):[0-5]\d)", re.ASCII
)


def _rfc3339(value: Any) -> Any:
    # Parsed here: after a before-validator, pydantic's strict mode takes only a datetime.
    if not isinstance(value, str):
        return value
    if not _RFC3339.fullmatch(value):
        raise ValueError("must be an RFC 3339 date-time with an offset, like 2024-01-01T09:30:00Z")
    return datetime.fromisoformat(value.upper())


Rfc3339 = Annotated[AwareDatetime, BeforeValidator(_rfc3339)]
# ``multipleOf`` is stated for the schema only: the validator's own message says what to use.
Dimension = Annotated[
    int,
    Field(ge=256, le=2048, json_schema_extra={"multipleOf": 16}),
    Whole,
    AfterValidator(_multiple_of_16),
]
RequestId = Annotated[str, Field(pattern=REQUEST_ID_PATTERN)]


class _Strict(BaseModel):
    # Unknown fields are errors: a typo such as ``num_image`` must not be silently ignored.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class GenerateParams(_Strict):
    """Text-to-image parameters."""

    prompt: Annotated[str, Field(min_length=1, max_length=4000)]
    style: StyleName | None = None
    width: Dimension = 1024
    height: Dimension = 1024
    num_images: Annotated[int, Field(ge=1, le=8), Whole] = 4
    seed: Annotated[int, Field(ge=0, le=MAX_SEED), Whole] | None = None
    num_inference_steps: Annotated[int, Field(ge=1, le=50), Whole] = 8
    guidance_scale: Annotated[float, Field(ge=0.0, le=20.0)] = 0.0

    def resolved_seed(self) -> int:
        """The seed to use: the given one, else one derived from the content.

        Deriving it from the content (not from the request id) makes identical requests
        reproduce identical images, which is what the cache and replays rely on.
        """
        if self.seed is not None:
            return self.seed
        content = self.model_dump(exclude={"seed"})
        digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).digest()
        return int.from_bytes(digest[:4], "big")


def _one_of_uri_or_base64(schema: dict[str, Any]) -> None:
    schema["oneOf"] = [{"required": ["uri"]}, {"required": ["base64"]}]
    for field in schema["properties"].values():
        field.pop("default", None)  # absent, never null


class ImageSource(_Strict):
    """Where an ``erase_text`` source image comes from: exactly one of ``uri`` or ``base64``.

    Neither may be ``null``: the schema says "one of two strings", and the worker agrees.
    """

    model_config = ConfigDict(json_schema_extra=_one_of_uri_or_base64)

    uri: Annotated[str, Field(min_length=1, max_length=2048)] | SkipJsonSchema[None] = None
    base64: (
        Annotated[str, Field(min_length=1, max_length=MAX_BASE64_CHARS)] | SkipJsonSchema[None]
    ) = None

    @model_validator(mode="before")
    @classmethod
    def _exactly_one(cls, data: Any) -> Any:
        if isinstance(data, dict):
            given = [name for name in ("uri", "base64") if name in data]
            if len(given) != 1:
                raise ValueError('give exactly one of "uri" or "base64"')
            if data[given[0]] is None:
                raise ValueError(f'"{given[0]}" must be a string, not null')
        return data


class EraseTextParams(_Strict):
    """Text-erasure parameters."""

    source: ImageSource
    languages: Annotated[list[Literal["en", "ch"]], Field(min_length=1)] = ["en", "ch"]
    engine: Literal["auto", "diffusion", "classical"] = "auto"


class _RequestBase(_Strict):
    schema_version: Annotated[Literal[1], BeforeValidator(_an_integer)]
    request_id: RequestId
    timeout_s: Annotated[float, Field(ge=1, le=300)] | None = None
    submitted_at: Rfc3339 | None = None

    def arrived_at(self, broker_timestamp_ms: int) -> float:
        """When the request entered the system (wall-clock seconds): its ``submitted_at``,
        else the broker's timestamp of its record. Queue times are measured from here."""
        if self.submitted_at is not None:
            with contextlib.suppress(OverflowError, ValueError, OSError):
                return self.submitted_at.timestamp()
        return broker_timestamp_ms / 1000


class GenerateRequest(_RequestBase):
    """A ``generate`` request event."""

    task: Literal["generate"]
    params: GenerateParams


class EraseTextRequest(_RequestBase):
    """An ``erase_text`` request event."""

    task: Literal["erase_text"]
    params: EraseTextParams


RequestEvent = Annotated[GenerateRequest | EraseTextRequest, Field(discriminator="task")]
_REQUEST_ADAPTER: TypeAdapter[GenerateRequest | EraseTextRequest] = TypeAdapter(RequestEvent)


class ImageRef(BaseModel):
    """A stored image: where it is and what it is."""

    uri: str
    width: int
    height: int
    content_type: str
    sha256: str
    size_bytes: int


class TextRegion(BaseModel):
    """Text found in an ``erase_text`` source before erasing."""

    box: list[tuple[float, float]]
    text: str
    confidence: float


class ErrorInfo(BaseModel):
    """Why a request did not succeed."""

    #: one of the contract's codes (a reader should still take a code it does not know)
    code: str = Field(json_schema_extra={"enum": list(ERROR_CODES)})
    message: str
    retriable: bool


class Provenance(BaseModel):
    """How a ``generate`` result was made, beside ``model``: enough to make it again."""

    seed: int  # of the first image; image i used seed + i
    num_inference_steps: int
    guidance_scale: float


class ModelInfo(BaseModel):
    """What produced the images."""

    id: str
    revision: str | None
    device: str
    dtype: str


class Timings(BaseModel):
    """Milliseconds spent queued (broker to batch start), in the model, and in total."""

    queued: float
    inference: float
    total: float


Status = Literal["succeeded", "failed", "rejected", "timed_out"]


class ProgressEvent(BaseModel):
    """A request's denoising progress (on ``ZIMAGE_PROGRESS_TOPIC``, keyed by request_id)."""

    schema_version: Literal[1] = 1
    request_id: str
    step: int
    total: int
    emitted_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class ResultEvent(BaseModel):
    """The answer to one processing attempt of one request."""

    schema_version: Literal[1] = 1
    request_id: str | None
    task: str | None
    status: Status
    images: list[ImageRef] = Field(default_factory=list)
    text_regions: list[TextRegion] = Field(default_factory=list)
    cache_hit: bool = False
    error: ErrorInfo | None = None
    model: ModelInfo | None = None
    provenance: Provenance | None = None
    timings_ms: Timings
    completed_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @model_validator(mode="after")
    def _error_iff_not_succeeded(self) -> ResultEvent:
        if (self.status == "succeeded") == (self.error is not None):
            raise ValueError("error must be set exactly when status is not 'succeeded'")
        return self

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def build(
        cls,
        request_id: str | None,
        task: str | None,
        error: ZImageError | None,
        *,
        model: ModelInfo,
        arrived_at: float,
        images: list[ImageRef] | None = None,
        text_regions: list[TextRegion] | None = None,
        cache_hit: bool = False,
        started_at: float | None = None,
        inference_s: float = 0.0,
        provenance: Provenance | None = None,
    ) -> ResultEvent:
        """The one way an answer becomes a result event: succeeded unless ``error``, whose
        code and retry flag become the event's ``error``. ``arrived_at`` and ``started_at``
        (wall-clock seconds) give the queue time; without ``started_at`` (no inference ran)
        the request was queued until now."""
        now = time.time()
        queued = (started_at if started_at is not None else now) - arrived_at
        return cls(
            request_id=request_id,
            task=task,
            status="succeeded" if error is None else error.status,  # type: ignore[arg-type]
            images=images or [],
            text_regions=text_regions or [],
            cache_hit=cache_hit,
            error=None if error is None else ErrorInfo(**error.to_dict()),  # type: ignore[arg-type]
            model=model,
            provenance=provenance,
            timings_ms=Timings(
                queued=round(max(0.0, queued) * 1000, 1),
                inference=round(inference_s * 1000, 1),
                total=round(max(0.0, now - arrived_at) * 1000, 1),
            ),
            completed_at=datetime.fromtimestamp(now, UTC),
        )


class RequestParseError(Exception):
    """A message that is not a valid request, with what could be read of it."""

    def __init__(self, error: ZImageError, request_id: str | None, task: str | None) -> None:
        super().__init__(error.message)
        self.error = error
        self.request_id = request_id
        self.task = task


def parse_request(raw: bytes | None, max_bytes: int) -> GenerateRequest | EraseTextRequest:
    """Validate one message value; raise :class:`RequestParseError` when it is not a request,
    and never anything else: one bad record must not stop its partition."""
    if raw is None:
        raise RequestParseError(InvalidJsonError("message has no value (a tombstone?)"), None, None)
    if len(raw) > max_bytes:
        too_large = InvalidRequestError(f"message is {len(raw)} bytes; the limit is {max_bytes}")
        raise RequestParseError(too_large, None, None)
    # The parser pydantic validates with (jiter), so that what it reads here is what it
    # validates below: strict UTF-8 with no byte-order mark or lone surrogate, bounded
    # nesting and bounded integers, each refused with a ValueError rather than a crash.
    try:
        document = from_json(raw)
    except ValueError as exc:
        raise RequestParseError(InvalidJsonError(f"not UTF-8 JSON: {exc}"), None, None) from None
    if not isinstance(document, dict):
        error = InvalidJsonError(f"expected a JSON object, got {type(document).__name__}")
        raise RequestParseError(error, None, None)
    request_id, task = _readable_identity(document)
    version = _whole(document.get("schema_version"))
    if version != SCHEMA_VERSION and isinstance(version, int) and not isinstance(version, bool):
        error_v = UnsupportedSchemaVersionError(
            f"schema_version {version} is not supported; this worker reads version {SCHEMA_VERSION}"
        )
        raise RequestParseError(error_v, request_id, task)
    try:
        return _REQUEST_ADAPTER.validate_json(raw)
    except ValidationError as exc:
        raise RequestParseError(InvalidRequestError(describe(exc)), request_id, task) from None
    except Exception as exc:  # a validator's own failure is still this message's refusal
        error_r = InvalidRequestError(f"could not be validated: {exc!r}")
        raise RequestParseError(error_r, request_id, task) from None


def _readable_identity(document: dict[str, Any]) -> tuple[str | None, str | None]:
    request_id = document.get("request_id")
    if not isinstance(request_id, str) or not _REQUEST_ID_RE.match(request_id):
        request_id = None
    task = document.get("task")
    if task not in ("generate", "erase_text"):
        task = None
    return request_id, task


def describe(exc: ValidationError, limit: int = 5) -> str:
    """Turn a pydantic error into one line that says where the input is wrong and how."""
    parts = []
    for err in exc.errors(include_url=False)[:limit]:
        where = ".".join(str(p) for p in err["loc"] if p not in ("generate", "erase_text"))
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown field (check its spelling against the contract)"
        parts.append(f"{where or 'message'}: {message}")
    more = exc.error_count() - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def json_schemas() -> dict[str, Any]:
    """The JSON Schemas of the request and result events (``zimage-stream schema``)."""
    return {
        "request": _REQUEST_ADAPTER.json_schema(),
        "result": ResultEvent.model_json_schema(),
    }
