"""Reading a record that aiokafka cannot decode, straight from the bytes the broker sends.

aiokafka decodes every header name as UTF-8 and raises out of ``getmany`` when one is not,
though Kafka accepts any bytes there (librdkafka sends them as given). To dead-letter such
a record with its original key and value, its batch is fetched once more as raw bytes and
the record is read here without decoding anything (record format v2, the one with
headers; older formats yield nothing). ``read_undecodable`` turns what could be read into
a consumer record and the reason it is refused, for the worker's usual rejection.

Two of aiokafka's internals are used: the consumer's own client (``_client``, to send one
``FetchRequest`` on the connection it already has) and that request's constructor; hence
aiokafka's exact pin in ``pyproject.toml``.
"""

from __future__ import annotations

import contextlib
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.codec import gzip_decode, lz4_decode, snappy_decode, zstd_decode
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.structs import ConsumerRecord

from .errors import InvalidRequestError
from .schemas import RequestParseError, parse_request

log = structlog.get_logger(__name__)

_BATCH = struct.Struct(">qiibIhiqqqhii")
_CODEC_MASK = 0x07
_LOG_APPEND_TIME = 0x08
_DECOMPRESS: dict[int, Callable[[bytes], bytes]] = {
    1: gzip_decode,
    2: snappy_decode,
    3: lz4_decode,
    4: zstd_decode,
}
#: how long the broker may wait for the bytes (Tansu answers a fetch that may not wait
#: with no data at all)
_FETCH_WAIT_MS = 100


class _BatchHeader(NamedTuple):
    """The fields of a record batch before its records (``_BATCH``)."""

    base_offset: int
    length: int  # counted from leader_epoch on
    leader_epoch: int
    magic: int
    crc: int
    attributes: int
    last_offset_delta: int
    first_timestamp: int
    max_timestamp: int
    producer_id: int
    producer_epoch: int
    base_sequence: int
    record_count: int


@dataclass(frozen=True)
class RawRecord:
    """One record as its bytes say, header names undecoded."""

    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[bytes, bytes | None]]


async def read_undecodable(
    consumer: AIOKafkaConsumer,
    tp: TopicPartition,
    offset: int,
    exc: Exception,
    fetch_bytes: int,
    max_message_bytes: int,
) -> tuple[ConsumerRecord[bytes, bytes], RequestParseError]:
    """What can be read of the record at ``offset`` that aiokafka failed to decode with
    ``exc``, as a consumer record, and why it is refused (naming the request when its
    value says). Its position is always known; its bytes are read when they can be."""
    raw = None
    try:
        raw = await fetch_raw_record(consumer, tp, offset, fetch_bytes)
    except Exception as read_error:  # the position alone is enough to dead-letter it
        log.warning("raw_record_unreadable", offset=offset, error=repr(read_error))
    return _stand_in(tp, offset, raw), _refusal(exc, raw, max_message_bytes)


async def fetch_raw_record(
    consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int, max_bytes: int
) -> RawRecord | None:
    """The record at ``offset`` of ``tp``, fetched from its leader as raw bytes; None if
    the broker does not send it or its batch cannot be read."""
    client = consumer._client
    partitions = [(tp.partition, offset, max_bytes)]
    request = FetchRequest(_FETCH_WAIT_MS, 1, max_bytes, 0, [(tp.topic, partitions)])
    response = await client.send(client.cluster.leader_for_partition(tp), request)
    for topic, answers in response.topics:
        for partition, error_code, _highwater, *data in answers:
            if (topic, partition) == (tp.topic, tp.partition) and error_code == 0:
                return find_record(bytes(data[-1]), offset)
    return None


def find_record(data: bytes, offset: int) -> RawRecord | None:
    """The record at ``offset`` among the record batches in ``data`` (a fetch's bytes)."""
    pos = 0
    while pos + _BATCH.size <= len(data):
        header = _BatchHeader._make(_BATCH.unpack_from(data, pos))
        end = pos + 12 + header.length
        if end > len(data):
            break  # a fetch may end inside a batch
        last_offset = header.base_offset + header.last_offset_delta
        if header.magic == 2 and header.base_offset <= offset <= last_offset:
            return _find_in_batch(header, data[pos + _BATCH.size : end], offset)
        pos = end
    return None


def _stand_in(
    tp: TopicPartition, offset: int, raw: RawRecord | None
) -> ConsumerRecord[bytes, bytes]:
    """A consumer record carrying what could be read: the headers named in UTF-8 only."""
    headers = []
    for name, value in raw.headers if raw is not None else []:
        with contextlib.suppress(UnicodeDecodeError):
            if value is not None:
                headers.append((name.decode(), value))
    key, value = (raw.key, raw.value) if raw is not None else (None, None)
    return ConsumerRecord(
        topic=tp.topic,
        partition=tp.partition,
        offset=offset,
        timestamp=raw.timestamp_ms if raw is not None else int(time.time() * 1000),
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=-1 if key is None else len(key),
        serialized_value_size=-1 if value is None else len(value),
        headers=headers,
    )


def _refusal(exc: Exception, raw: RawRecord | None, max_message_bytes: int) -> RequestParseError:
    """Why the record is refused, and the request it names when its value is readable."""
    read = "its key and value are kept" if raw is not None else "its bytes could not be read"
    message = f"the record cannot be decoded ({type(exc).__name__}: {exc}); {read}"
    request_id: str | None = None
    task: str | None = None
    if raw is not None:
        try:
            request = parse_request(raw.value, max_message_bytes)
            request_id, task = request.request_id, request.task
        except RequestParseError as unreadable:
            request_id, task = unreadable.request_id, unreadable.task
    return RequestParseError(InvalidRequestError(message), request_id, task)


def _find_in_batch(header: _BatchHeader, records: bytes, offset: int) -> RawRecord | None:
    codec = header.attributes & _CODEC_MASK
    reader = _Reader(_DECOMPRESS[codec](records) if codec else records)
    for _ in range(header.record_count):
        length = reader.varint()
        end = reader.pos + length
        reader.pos += 1  # the record's attributes, unused
        timestamp_delta, offset_delta = reader.varint(), reader.varint()
        if header.base_offset + offset_delta == offset:
            key, value = reader.chunk(), reader.chunk()
            headers = [(reader.chunk() or b"", reader.chunk()) for _ in range(reader.varint())]
            timestamp_ms = header.first_timestamp + timestamp_delta
            if header.attributes & _LOG_APPEND_TIME:  # the broker's time, for the whole batch
                timestamp_ms = header.max_timestamp
            return RawRecord(offset, timestamp_ms, key, value, headers)
        reader.pos = end
    return None


class _Reader:
    """Zigzag varints and length-prefixed chunks, as the record format writes them."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def varint(self) -> int:
        shift = result = 0
        while True:
            byte = self.data[self.pos]
            self.pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return (result >> 1) ^ -(result & 1)
            shift += 7

    def chunk(self) -> bytes | None:
        length = self.varint()
        if length < 0:
            return None
        start, self.pos = self.pos, self.pos + length
        if self.pos > len(self.data):
            raise ValueError("a record runs past its batch")
        return self.data[start : self.pos]
