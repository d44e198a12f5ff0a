"""Record batches no aiokafka producer writes: a header name that is not UTF-8, and a
batch that fails its checksum.

Kafka takes any bytes as a header name (librdkafka sends them as given); aiokafka's
producer takes only ``str`` names. So a batch is built with a placeholder name of the
same length, which is then overwritten in the built bytes, and the batch checksum
recomputed. (Apache Kafka refuses a batch with a wrong checksum; Tansu stores it.)
"""

from __future__ import annotations

import struct

from aiokafka import AIOKafkaProducer
from aiokafka.record.util import calc_crc32c

#: a header name that is not UTF-8 (0xff never occurs in UTF-8)
RAW_NAME = b"\xff\xfeid"
_CRC_AT = 17  # the batch checksum; it covers everything from the attributes (at 21) on


def rename_header(batch: bytearray, placeholder: str, raw: bytes) -> None:
    """Overwrite header name ``placeholder`` with ``raw`` in an uncompressed, built
    ``batch`` (in place), and fix the checksum."""
    old = placeholder.encode()
    assert len(old) == len(raw) and bytes(batch).count(old) == 1, "the name must be unique"
    start = bytes(batch).index(old)
    batch[start : start + len(raw)] = raw
    crc = calc_crc32c(bytes(batch[_CRC_AT + 4 :]))
    batch[_CRC_AT : _CRC_AT + 4] = struct.pack(">I", crc)


async def send_with_raw_header_name(
    producer: AIOKafkaProducer, topic: str, partition: int, key: bytes, value: bytes
) -> int:
    """Produce one record with header ``RAW_NAME`` (uncompressed); its offset."""
    placeholder = "h" * len(RAW_NAME)
    batch = producer.create_batch()
    batch.append(key=key, value=value, timestamp=None, headers=[(placeholder, b"1")])
    # aiokafka 0.14 builds the bytes once, in _build, and sends what it returns after.
    rename_header(batch._build(), placeholder, RAW_NAME)
    sent = await producer.send_batch(batch, topic, partition=partition)
    return int((await sent).offset)


async def send_with_bad_checksum(
    producer: AIOKafkaProducer, topic: str, partition: int, key: bytes, value: bytes
) -> int:
    """Produce one record in a batch whose checksum is wrong; its offset."""
    batch = producer.create_batch()
    batch.append(key=key, value=value, timestamp=None, headers=[])
    batch._build()[_CRC_AT] ^= 0xFF
    sent = await producer.send_batch(batch, topic, partition=partition)
    return int((await sent).offset)
