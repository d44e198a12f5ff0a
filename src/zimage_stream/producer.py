"""Publishing result events and dead-lettering messages that are not requests."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer

from .kafka_security import security_options
from .schemas import ProgressEvent, ResultEvent
from .settings import KafkaSettings

log = structlog.get_logger(__name__)

PUBLISH_ATTEMPTS = 5


class ResultProducer:
    """Writes to the results and DLQ topics; every send waits for the broker's ack."""

    def __init__(self, settings: KafkaSettings, **client_options: Any) -> None:
        self._settings = settings
        self._client_options = {**security_options(settings), **client_options}
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        if self._producer is not None:
            return
        producer = AIOKafkaProducer(
            bootstrap_servers=self._settings.bootstrap_servers,
            client_id=self._settings.client_id,
            acks="all",
            linger_ms=2,
            max_request_size=self._settings.max_message_bytes + 64 * 1024,
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
        self,
        result: ResultEvent,
        key: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
        attempts: int = PUBLISH_ATTEMPTS,
    ) -> bool:
        """Publish one result keyed by its request id (or the original key when it has none),
        trying ``attempts`` times with a growing pause; False when it could not be published
        (the request's offset then stays uncommitted and is read again)."""
        if result.request_id is not None:
            key = result.request_id.encode()
        for attempt in range(1, attempts + 1):
            try:
                await self._send(
                    self._settings.results_topic, key, result.to_bytes(), headers or []
                )
                return True
            except Exception as exc:
                log.warning("publish_failed", attempt=attempt, error=repr(exc))
                await asyncio.sleep(min(2.0**attempt * 0.1, 5.0))
        log.error("result_not_published", note="offset left uncommitted for redelivery")
        return False

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
    ) -> None:
        """Send the original bytes, unchanged, to the DLQ with the reason in headers."""
        topic, partition, offset = source
        reason = [
            ("error.code", code.encode()),
            ("error.message", message[:1000].encode()),
            ("source.topic", topic.encode()),
            ("source.partition", str(partition).encode()),
            ("source.offset", str(offset).encode()),
        ]
        reserved = {name for name, _ in reason}
        kept = [(k, v) for k, v in headers or [] if k not in reserved]
        await self._send(self._settings.dlq_topic, key, value, kept + reason)
        log.warning("dead_lettered", code=code, source_partition=partition, source_offset=offset)

    async def flush(self) -> None:
        """Wait until everything sent so far is acknowledged (before offsets are committed)."""
        if self._producer is not None:
            await self._producer.flush()

    async def _send(
        self, topic: str, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]
    ) -> None:
        if self._producer is None:
            raise RuntimeError("ResultProducer is not started")
        await self._producer.send_and_wait(topic, value=value, key=key, headers=headers)
