"""Reading records from raw batch bytes, and the seam with aiokafka: what it raises at a
header name that is not UTF-8, and that the bytes it builds are the ones read here."""

from __future__ import annotations

import struct

import pytest
from aiokafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords

from tests.support.records import RAW_NAME, rename_header
from zimage_stream.raw_records import RawRecord, find_record

CODECS = {"none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}
T0 = 1_700_000_000_000


def _batch(base_offset: int, count: int, codec: int = 0, headers: bool = True) -> bytearray:
    """``count`` records at ``base_offset``, as a broker stores them."""
    builder = DefaultRecordBatchBuilder(2, codec, 0, -1, -1, -1, 1 << 20)
    for i in range(count):
        offset = base_offset + i
        named = [("traceparent", f"t-{offset}".encode())] if headers else []
        builder.append(i, T0 + i, f"k-{offset}".encode(), f"v-{offset}".encode(), named)
    batch = builder.build()
    batch[:8] = struct.pack(">q", base_offset)  # the broker's; outside the checksum
    return batch


@pytest.mark.parametrize("codec", CODECS)
def test_a_record_is_found_in_any_codec(codec: str) -> None:
    data = bytes(_batch(10, 3, CODECS[codec]) + _batch(13, 2, CODECS[codec]))
    assert find_record(data, 11) == RawRecord(
        11, T0 + 1, b"k-11", b"v-11", [(b"traceparent", b"t-11")]
    )
    found = find_record(data, 14)
    assert found is not None and found.value == b"v-14" and found.timestamp_ms == T0 + 1
    assert find_record(data, 9) is None and find_record(data, 15) is None


def test_a_batch_cut_off_at_the_end_of_a_fetch_is_not_read() -> None:
    whole, cut = _batch(0, 2), _batch(2, 2)
    data = bytes(whole + cut[: len(cut) - 5])
    assert find_record(data, 1) is not None
    assert find_record(data, 2) is None


def test_a_header_name_that_is_not_utf8_is_read_as_bytes_where_aiokafka_raises() -> None:
    builder = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, 1 << 20)
    builder.append(0, T0, b"key", b'{"x": 1}', [("tp", b"1"), ("h" * len(RAW_NAME), b"2")])
    batch = builder.build()
    rename_header(batch, "h" * len(RAW_NAME), RAW_NAME)

    parsed = MemoryRecords(bytes(batch)).next_batch()
    assert isinstance(parsed, DefaultRecordBatch) and parsed.validate_crc()
    with pytest.raises(UnicodeDecodeError):
        list(parsed)
    assert find_record(bytes(batch), 0) == RawRecord(
        0, T0, b"key", b'{"x": 1}', [(b"tp", b"1"), (RAW_NAME, b"2")]
    )


def test_null_keys_values_and_headers() -> None:
    builder = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, 1 << 20)
    builder.append(0, T0, None, None, [("empty", None)])
    expected = RawRecord(0, T0, None, None, [(b"empty", None)])
    assert find_record(bytes(builder.build()), 0) == expected
