"""Publishing result events and dead-lettering messages that are not requests."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaTimeoutError

from .kafka_security import security_options
from .schemas import ProgressEvent, ResultEvent
from .settings import KafkaSettings

log = structlog.get_logger(__name__)

#: how long a result or dead letter that the broker refuses for a passing reason (it is
#: unreachable, a leader is moving) is tried again before it is given up: long enough that
#: a broker restart or a short outage loses nothing
SEND_BUDGET_S = 600.0
#: the DLQ header that marks a copy cut to ``max_message_bytes``: the original's length
TRUNCATED_HEADER = "value.truncated"
#: a dead letter keeps the original's headers up to this many bytes (the producer's
#: request limit leaves 64 KiB above ``max_message_bytes``)
HEADERS_KEPT_BYTES = 32 * 1024


class ResultProducer:
    """Writes to the results and DLQ topics; every send waits for the broker's ack.

    A result or dead letter that cannot be delivered is never left hanging: a passing
    failure is tried again with a growing pause for up to ``send_budget_s``, a permanent
    one (too large, not authorised, no such topic name) is not, and either way the caller
    learns that it was given up, which is logged and counted in ``undelivered``.
    """

    def __init__(
        self, settings: KafkaSettings, send_budget_s: float = SEND_BUDGET_S, **client_options: Any
    ) -> None:
        self._settings = settings
        self._send_budget_s = send_budget_s
        self._client_options = {**security_options(settings), **client_options}
        self._producer: AIOKafkaProducer | None = None
        #: results and dead letters given up, by kind ("result", "dead_letter")
        self.undelivered: Counter[str] = Counter()

    async def start(self) -> None:
        if self._producer is not None:
            return
        producer = AIOKafkaProducer(
            bootstrap_servers=self._settings.bootstrap_servers,
            client_id=self._settings.client_id,
            acks="all",
            linger_ms=2,
            max_request_size=self._settings.request_limit_bytes,
            **self._client_options,
        )
        await producer.start()
        self._producer = producer

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    async def __aenter__(self) -> ResultProducer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def publish_result(
        self, result: ResultEvent, key: bytes | None, headers: list[tuple[str, bytes]] | None = None
    ) -> bool:
        """Publish one result keyed by its request id (or the original key when it has none);
        False when it was given up."""
        if result.request_id is not None:
            key = result.request_id.encode()
        topic = self._settings.results_topic
        return await self._deliver("result", topic, key, result.to_bytes(), headers or [])

    async def publish_progress(self, event: ProgressEvent) -> None:
        """Best effort: a lost progress event only makes a progress bar skip."""
        await self._send(
            self._settings.progress_topic,
            event.request_id.encode(),
            event.model_dump_json().encode(),
            [],
        )

    async def dead_letter(
        self,
        value: bytes | None,
        key: bytes | None,
        source: tuple[str, int, int],
        code: str,
        message: str,
        headers: list[tuple[str, bytes]] | None = None,
        attempts: int | None = None,
    ) -> bool:
        """Send the original bytes, unchanged, to the DLQ with the reason in headers; False
        when it was given up. ``attempts``: how many times it was tried (a poison request).

        A record larger than ``max_message_bytes`` (the broker accepted it, and the worker
        refused it for its size) is cut to that size, with its original length in the
        ``value.truncated`` header: a copy the producer cannot send would leave nothing in
        the DLQ, while the source headers still point at the whole record.
        """
        topic, partition, offset = source
        truncated: list[tuple[str, bytes]] = []
        limit = self._settings.max_message_bytes
        if value is not None and len(value) > limit:
            truncated = [(TRUNCATED_HEADER, str(len(value)).encode())]
            value = value[:limit]
        reason = [
            ("error.code", code.encode()),
            ("error.message", message[:1000].encode()),
            ("source.topic", topic.encode()),
            ("source.partition", str(partition).encode()),
            ("source.offset", str(offset).encode()),
        ]
        reason += truncated
        if attempts is not None:
            reason.append(("attempts", str(attempts).encode()))
        reserved = {name for name, _ in reason}
        kept = [(k, v) for k, v in headers or [] if k not in reserved]
        if sum(len(k) + len(v) for k, v in kept) > HEADERS_KEPT_BYTES:
            kept = []  # the source record still has them
        if not await self._deliver(
            "dead_letter", self._settings.dlq_topic, key, value, kept + reason
        ):
            return False
        log.warning("dead_lettered", code=code, source_partition=partition, source_offset=offset)
        return True

    async def flush(self) -> None:
        """Wait until everything sent so far is acknowledged (before offsets are committed)."""
        if self._producer is not None:
            await self._producer.flush()

    async def _deliver(
        self,
        kind: str,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]],
    ) -> bool:
        deadline = time.monotonic() + self._send_budget_s
        for attempt in itertools.count(1):
            try:
                await self._send(topic, key, value, headers)
                return True
            except Exception as exc:
                pause = min(2.0**attempt * 0.1, 5.0)
                again = _passing(exc) and time.monotonic() + pause < deadline
                log.warning("send_failed", kind=kind, attempt=attempt, error=repr(exc), again=again)
                if not again:
                    break
                await asyncio.sleep(pause)
        self.undelivered[kind] += 1
        log.error("send_given_up", kind=kind, topic=topic, note="its record is settled without it")
        return False

    async def _send(
        self, topic: str, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]
    ) -> None:
        if self._producer is None:
            raise RuntimeError("ResultProducer is not started")
        await self._producer.send_and_wait(topic, value=value, key=key, headers=headers)


def _passing(exc: Exception) -> bool:
    """Whether sending again may succeed: the broker could not be reached in time, or says
    so itself (aiokafka's ``retriable`` errors)."""
    return isinstance(exc, KafkaTimeoutError | OSError) or bool(getattr(exc, "retriable", False))
