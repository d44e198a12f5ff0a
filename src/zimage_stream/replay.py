"""Re-publishing a range of the requests topic, for reprocessing (``zimage-stream replay``).

The range is a time window (``offsets_for_times`` finds where it starts and ends in each
partition) or explicit per-partition offsets. Each request is published again unchanged,
with its headers, plus ``replay: 1``; ``force`` adds ``replay-force: 1``, which makes the
worker skip the cache and compute the result again (after a model upgrade, say). An
unforced replay is answered from the cache (``cache_hit: true``) while the entries last.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from .client import topic_partitions
from .kafka_security import security_options
from .schemas import FORCE_HEADER, REPLAY_HEADER
from .settings import KafkaSettings


@dataclass
class ReplaySummary:
    """What a replay found and did."""

    ranges: dict[int, tuple[int, int]]  # partition -> [start, end)
    published: int = 0
    skipped_tombstones: int = 0
    by_task: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(end - start for start, end in self.ranges.values())


async def replay(
    settings: KafkaSettings,
    since: datetime | None = None,
    until: datetime | None = None,
    from_offsets: dict[int, int] | None = None,
    to_offsets: dict[int, int] | None = None,
    force: bool = False,
    dry_run: bool = False,
    on_record: Callable[[int, int], None] | None = None,
) -> ReplaySummary:
    """Re-publish the requests in the range; with ``dry_run`` only count them (by task,
    too: the range is read either way). ``on_record(done, total)`` follows the reading."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        enable_auto_commit=False,
        group_id=None,
        **security_options(settings),
    )
    await consumer.start()
    producer: AIOKafkaProducer | None = None
    try:
        partitions = await topic_partitions(consumer, settings.requests_topic)
        ranges = await _ranges(consumer, partitions, since, until, from_offsets, to_offsets)
        summary = ReplaySummary(ranges=ranges)
        if summary.total == 0:
            return summary
        if not dry_run:
            producer = AIOKafkaProducer(
                bootstrap_servers=settings.bootstrap_servers,
                acks="all",
                **security_options(settings),
            )
            await producer.start()
        marks = [(REPLAY_HEADER, b"1")] + ([(FORCE_HEADER, b"1")] if force else [])
        done = 0
        async for record in _records(consumer, partitions, ranges):
            done += 1
            if on_record is not None:
                on_record(done, summary.total)
            if record.value is None:
                summary.skipped_tombstones += 1
                continue
            summary.by_task[_task_of(record.value)] += 1
            if producer is None:
                continue
            headers = [(k, v) for k, v in (record.headers or []) if k not in dict(marks)]
            await producer.send_and_wait(
                settings.requests_topic, record.value, key=record.key, headers=headers + marks
            )
            summary.published += 1
        return summary
    finally:
        if producer is not None:
            await producer.stop()
        await consumer.stop()


async def _records(
    consumer: AIOKafkaConsumer,
    partitions: list[TopicPartition],
    ranges: dict[int, tuple[int, int]],
) -> AsyncIterator[ConsumerRecord[bytes, bytes]]:
    """Every record in ``[start, end)`` of each partition, partition by partition."""
    for tp in partitions:
        start, end = ranges.get(tp.partition, (0, 0))
        if start >= end:
            continue
        consumer.assign([tp])
        consumer.seek(tp, start)
        position = start
        while position < end:
            fetched = await consumer.getmany(tp, timeout_ms=1000, max_records=500)
            for record in fetched.get(tp, []):
                if record.offset >= end:
                    position = end
                    break
                position = record.offset + 1
                yield record


async def _ranges(
    consumer: AIOKafkaConsumer,
    partitions: list[TopicPartition],
    since: datetime | None,
    until: datetime | None,
    from_offsets: dict[int, int] | None,
    to_offsets: dict[int, int] | None,
) -> dict[int, tuple[int, int]]:
    """[start, end) per partition: offsets found for the times, or the ones given."""
    ends = await consumer.end_offsets(partitions)
    begins = await consumer.beginning_offsets(partitions)
    starts = {tp: begins[tp] for tp in partitions}
    stops = dict(ends)
    if since is not None:
        starts = await _offsets_at(consumer, partitions, since, ends)
    if until is not None:
        stops = await _offsets_at(consumer, partitions, until, ends)
    if from_offsets is not None:
        starts = {tp: from_offsets.get(tp.partition, ends[tp]) for tp in partitions}
    if to_offsets is not None:
        stops = {tp: min(to_offsets.get(tp.partition, ends[tp]), ends[tp]) for tp in partitions}
    return {
        tp.partition: (max(starts[tp], begins[tp]), max(starts[tp], begins[tp], stops[tp]))
        for tp in partitions
    }


async def _offsets_at(
    consumer: AIOKafkaConsumer,
    partitions: list[TopicPartition],
    moment: datetime,
    ends: dict[TopicPartition, int],
) -> dict[TopicPartition, int]:
    """The first offset at or after ``moment`` per partition (its end when there is none:
    Kafka answers None, Tansu an offset with timestamp -1)."""
    found = await consumer.offsets_for_times(
        {tp: int(moment.timestamp() * 1000) for tp in partitions}
    )
    offsets = {}
    for tp in partitions:
        hit = found.get(tp)
        offsets[tp] = hit.offset if hit is not None and hit.timestamp >= 0 else ends[tp]
    return offsets


def _task_of(value: bytes) -> str:
    import json

    try:
        task = json.loads(value).get("task")
    except (ValueError, AttributeError):
        return "unreadable"
    return task if isinstance(task, str) else "unreadable"
