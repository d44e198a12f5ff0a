"""Reading requests: an aiokafka consumer group member that commits only answered offsets.

The commit loop lives here, in one home, as quix-streams' ``Checkpoint`` does it: when
answers come in, the producer is flushed first and then every partition is committed up
to its lowest unanswered offset. Bursts of answers coalesce into one commit.

A record aiokafka cannot decode (a header name that is not UTF-8) makes ``getmany`` raise,
and without care every worker that takes the partition would stop at it. ``fetch`` then
reads past it and delivers it as a :class:`Delivery` with an ``error``, for the worker to
dead-letter.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import (
    CommitFailedError,
    CorruptRecordException,
    IllegalStateError,
    KafkaError,
)
from aiokafka.structs import ConsumerRecord

from .kafka_security import security_options
from .offsets import OffsetTracker
from .raw_records import read_undecodable
from .schemas import RequestParseError
from .settings import KafkaSettings

log = structlog.get_logger(__name__)

#: what aiokafka raises out of ``getmany`` at a record it cannot decode: a header name that
#: is not UTF-8, a batch that fails its checksum. Fetched again, such a record fails again.
UNDECODABLE = (UnicodeDecodeError, CorruptRecordException)


@dataclass(eq=False)
class Delivery:
    """One record read from the requests topic, and the tracker that owns its offset."""

    record: ConsumerRecord[bytes, bytes]
    tracker: OffsetTracker
    #: set when aiokafka could not decode the record: ``record`` then holds what could be
    #: read of it (its position always; key, value and UTF-8-named headers when its raw
    #: bytes could be read), and the worker dead-letters it
    error: RequestParseError | None = None

    @property
    def source(self) -> tuple[str, int, int]:
        return self.record.topic, self.record.partition, self.record.offset

    @property
    def headers(self) -> list[tuple[str, bytes]]:
        return list(self.record.headers or [])


class RequestConsumer:
    """Consumer-group member on the requests topic with manual, contiguous commits.

    ``fetch`` returns records as :class:`Delivery` objects; the worker calls ``done`` when a
    record's answer is acknowledged, and the commit loop (started with the consumer) then
    runs ``flush`` (the producer's, so nothing acknowledged is still buffered) and commits
    every partition up to its lowest unanswered offset. On a rebalance, revoked partitions
    commit what they can and their trackers are dropped: answers still in flight for them
    are published but not committed, so the new owner reprocesses those records
    (at-least-once, idempotent). ``stop`` commits once more and leaves the group.
    """

    #: the commit loop's pause after a commit, so a burst of answers makes one commit
    COALESCE_S = 0.02

    def __init__(
        self,
        settings: KafkaSettings,
        flush: Callable[[], Awaitable[None]] | None = None,
        **client_options: Any,
    ) -> None:
        self._settings = settings
        self._flush = flush
        self._client_options = {**security_options(settings), **client_options}
        self._consumer: AIOKafkaConsumer | None = None
        self._trackers: dict[TopicPartition, OffsetTracker] = {}
        self._paused = False
        self._commit_wanted = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        self._committer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._consumer is not None:
            return
        s = self._settings
        consumer = AIOKafkaConsumer(
            bootstrap_servers=s.bootstrap_servers,
            client_id=s.client_id,
            group_id=s.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=self._partition_fetch_bytes,
            fetch_max_bytes=max(52_428_800, s.max_message_bytes * 2),
            fetch_max_wait_ms=s.fetch_max_wait_ms,
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=min(3000, s.session_timeout_ms // 3),
            max_poll_interval_ms=s.max_poll_interval_ms,
            **self._client_options,
        )
        consumer.subscribe([s.requests_topic], listener=_Listener(self))
        await consumer.start()
        self._consumer = consumer
        self._committer = asyncio.create_task(self._commit_loop(), name="committer")

    async def stop(self, flush_timeout_s: float = 10.0) -> None:
        committer, self._committer = self._committer, None
        if committer is not None:
            committer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await committer
        if self._consumer is None:
            return
        # Only acknowledged answers count towards a commit, so a flush that cannot finish
        # (the broker is gone) must not keep the member from leaving its group.
        await self.commit(flush_timeout_s)
        consumer, self._consumer = self._consumer, None
        await consumer.stop()  # leaves the group
        self._trackers.clear()

    async def __aenter__(self) -> RequestConsumer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def _partition_fetch_bytes(self) -> int:
        """The most bytes one fetch reads of a partition: room for the largest record."""
        return self._settings.request_limit_bytes

    @property
    def in_flight(self) -> int:
        """Records read and not yet answered, over all assigned partitions."""
        return sum(len(t) for t in self._trackers.values())

    def lag(self) -> dict[int, int]:
        """Records behind the partition's end, per assigned partition (from the last fetch)."""
        consumer = self._require()
        lag = {}
        for tp, tracker in self._trackers.items():
            end = consumer.highwater(tp)
            if end is not None:
                lag[tp.partition] = max(0, end - tracker.position())
        return lag

    async def fetch(self, timeout_ms: int, max_in_flight: int) -> list[Delivery]:
        """New records, at most as many as keep the records in flight (read, not yet
        answered) within ``max_in_flight``. At the mark the partitions are paused, and
        fetching resumes once half of them are answered; paused, the member still polls,
        so it stays in its group however long the answers take."""
        consumer = self._require()
        max_records = max(1, max_in_flight - self.in_flight)
        try:
            batches = await consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        except UNDECODABLE as exc:
            log.warning("undecodable_record_fetched", error=repr(exc))
            deliveries = await self._fetch_singly(consumer, timeout_ms, max_records)
        else:
            deliveries = []
            for tp, records in batches.items():
                tracker = self._trackers.get(tp)
                if tracker is None:  # revoked between the fetch and now
                    continue
                for record in records:
                    tracker.track(record.offset)
                    deliveries.append(Delivery(record, tracker))
        if self.in_flight >= max_in_flight:
            self.pause()
        elif self.in_flight <= max_in_flight // 2:
            self.resume()
        return deliveries

    async def _fetch_singly(
        self, consumer: AIOKafkaConsumer, timeout_ms: int, max_records: int
    ) -> list[Delivery]:
        """Read past a record that made ``getmany`` raise.

        The failed ``getmany`` returned nothing, yet may have moved other partitions past
        records it had read, so first every partition goes back to just after its last
        delivered record. Then each is read one record at a time, so that a failure leaves
        the partition's position at the failing record: that record is delivered with its
        error, and the partition moves on past it.
        """
        await self._rewind(consumer)
        # After a seek the partition waits for a fetch of its own; one already in flight
        # may hold the broker's full wait.
        wait_ms = timeout_ms + self._settings.fetch_max_wait_ms
        deliveries: list[Delivery] = []
        for tp in sorted(consumer.assignment()):
            tracker = self._trackers.get(tp)
            while tracker is not None and len(deliveries) < max_records:
                try:
                    batch = await consumer.getmany(tp, timeout_ms=wait_ms, max_records=1)
                except UNDECODABLE as exc:
                    deliveries.append(await self._skip_undecodable(consumer, tp, tracker, exc))
                    break
                if not batch:
                    break
                for record in batch.get(tp, []):
                    tracker.track(record.offset)
                    deliveries.append(Delivery(record, tracker))
        return deliveries

    async def _rewind(self, consumer: AIOKafkaConsumer) -> None:
        """Every partition back to the offset after its last delivered record, or where
        its reading began when none was delivered: the committed offset, else the start
        (``auto_offset_reset`` is ``earliest``)."""
        for tp, tracker in list(self._trackers.items()):
            offset = tracker.next_offset()
            if offset is None:
                offset = await consumer.committed(tp)
            with contextlib.suppress(IllegalStateError):  # revoked meanwhile
                if offset is None:
                    await consumer.seek_to_beginning(tp)
                else:
                    consumer.seek(tp, offset)

    async def _skip_undecodable(
        self,
        consumer: AIOKafkaConsumer,
        tp: TopicPartition,
        tracker: OffsetTracker,
        exc: Exception,
    ) -> Delivery:
        """The record at the partition's position, which aiokafka cannot decode, as a
        delivery with its error; the partition's position moves past it."""
        offset = await consumer.position(tp)
        consumer.seek(tp, offset + 1)
        tracker.track(offset)
        log.warning("undecodable_record", partition=tp.partition, offset=offset, error=repr(exc))
        record, error = await read_undecodable(
            consumer, tp, offset, exc, self._partition_fetch_bytes, self._settings.max_message_bytes
        )
        return Delivery(record, tracker, error)

    def done(self, delivery: Delivery) -> None:
        """The record's answer is acknowledged: its offset may be committed."""
        delivery.tracker.done(delivery.record.offset)
        self._commit_wanted.set()

    async def commit(self, flush_timeout_s: float | None = None) -> None:
        """Flush the producer (within ``flush_timeout_s``), then commit every partition up
        to its lowest unanswered offset."""
        async with self._commit_lock:
            if self._flush is not None:
                try:
                    await asyncio.wait_for(self._flush(), flush_timeout_s)
                except TimeoutError:
                    log.warning("producer_flush_timed_out", timeout_s=flush_timeout_s)
            await self._commit(self._require(), list(self._trackers))

    async def _commit_loop(self) -> None:
        while True:
            await self._commit_wanted.wait()
            self._commit_wanted.clear()
            try:
                await self.commit()
            except Exception as exc:  # the records stay uncommitted until the next commit
                log.warning("commit_failed", error=repr(exc))
            await asyncio.sleep(self.COALESCE_S)

    def pause(self) -> None:
        """Stop fetching (the member keeps polling, so it stays in its group)."""
        consumer = self._require()
        if not self._paused:
            consumer.pause(*consumer.assignment())
            self._paused = True
            log.info("consumer_paused", in_flight=self.in_flight)

    def resume(self) -> None:
        consumer = self._require()
        if self._paused:
            consumer.resume(*consumer.assignment())
            self._paused = False
            log.info("consumer_resumed", in_flight=self.in_flight)

    async def _commit(self, consumer: AIOKafkaConsumer, partitions: list[TopicPartition]) -> None:
        offsets = {}
        for tp in partitions:
            tracker = self._trackers.get(tp)
            position = tracker.committable() if tracker is not None else None
            if position is not None:
                offsets[tp] = position
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:
            # The records stay uncommitted and are read again by whoever owns them next.
            log.warning("commit_failed", error=repr(exc), partitions=len(offsets))
            return
        log.debug("offsets_committed", offsets={tp.partition: o for tp, o in offsets.items()})
        for tp, position in offsets.items():
            tracker = self._trackers.get(tp)
            if tracker is not None:
                tracker.mark_committed(position)

    def _assigned(self, partitions: set[TopicPartition]) -> None:
        for tp in partitions:
            self._trackers.setdefault(tp, OffsetTracker())
        if self._paused and self._consumer is not None:
            self._consumer.pause(*partitions)
        log.info("partitions_assigned", partitions=sorted(tp.partition for tp in partitions))

    async def _revoked(self, partitions: set[TopicPartition]) -> None:
        if self._consumer is not None:
            await self._commit(self._consumer, list(partitions))
        for tp in partitions:
            self._trackers.pop(tp, None)
        log.info("partitions_revoked", partitions=sorted(tp.partition for tp in partitions))

    def _require(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("RequestConsumer is not started")
        return self._consumer


class _Listener(ConsumerRebalanceListener):
    def __init__(self, owner: RequestConsumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._owner._revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._owner._assigned(set(assigned))
