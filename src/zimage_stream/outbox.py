"""What leaves the worker for a record: its result event, or its dead letter, and then the
record settled.

A processing attempt of a record ends here once (``publish``), whatever became of the
request, unless the worker stops first (the record is then left uncommitted and read again
by the next owner): a result the broker refuses for good (too large, say) is replaced by a
small ``internal`` one, and if that is refused too the record is settled without a result
(the producer logged and counted it), so no record stays in flight for good and its
partition keeps moving. A message that is not a valid request is dead-lettered with its
original bytes and headers, and answered when it carries enough to answer (``reject``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog
from structlog.contextvars import bound_contextvars

from .consumer import Delivery, RequestConsumer
from .errors import InternalError, PoisonRequestError, ZImageError
from .logs import request_context
from .metrics import WorkerMetrics
from .producer import ResultProducer
from .schemas import PASSED_HEADERS, ModelInfo, RequestParseError, ResultEvent

log = structlog.get_logger(__name__)


class Outbox:
    """Publishes results and dead letters for the worker and settles their records.

    The producer and consumer exist only while the worker runs; ``producer`` and
    ``consumer`` return them (and raise when it does not). ``stats`` is the worker's
    counters (``results``, ``dead_letters``), counted here."""

    def __init__(
        self,
        producer: Callable[[], ResultProducer],
        consumer: Callable[[], RequestConsumer],
        model_info: Callable[[], ModelInfo],
        metrics: WorkerMetrics,
        stats: dict[str, int],
    ) -> None:
        self._producer, self._consumer, self._model_info = producer, consumer, model_info
        self._metrics, self._stats = metrics, stats

    async def dead_letter(self, delivery: Delivery, error: ZImageError) -> None:
        """The record's original bytes and headers to the DLQ, with why (and, for a poison
        request, how many times the engine died with it)."""
        record = delivery.record
        attempts = error.attempts if isinstance(error, PoisonRequestError) else None
        if await self._producer().dead_letter(
            record.value,
            record.key,
            delivery.source,
            error.code,
            error.message,
            delivery.headers,
            attempts,
        ):
            self._stats["dead_letters"] += 1

    async def reject(self, delivery: Delivery, exc: RequestParseError) -> None:
        """Dead-letter a message that is not a valid request, and answer it when possible."""
        record = delivery.record
        with bound_contextvars(**request_context(exc.request_id, exc.task, delivery.headers)):
            await self.dead_letter(delivery, exc.error)
            log.info("request_refused", code=exc.error.code, reason=exc.error.message)
            result = ResultEvent.build(
                exc.request_id,
                exc.task,
                exc.error,
                model=self._model_info(),
                arrived_at=record.timestamp / 1000,
            )
            await self.publish(delivery, result)

    async def publish(self, delivery: Delivery, result: ResultEvent) -> None:
        """Publish the result and settle the record's offset (see the module). Its callers
        have bound the request's log context."""
        producer = self._producer()
        headers = [(k, v) for k, v in delivery.headers if k in PASSED_HEADERS]
        published = await producer.publish_result(result, delivery.record.key, headers)
        if not published and result.error is None:
            refused = InternalError("the result could not be published (see the worker's log)")
            result = ResultEvent.build(
                result.request_id,
                result.task,
                refused,
                model=result.model or self._model_info(),
                arrived_at=time.time() - result.timings_ms.total / 1000,
            )
            published = await producer.publish_result(result, delivery.record.key, headers)
        self._consumer().done(delivery)
        if not published:
            return
        self._stats["results"] += 1
        code = result.error.code if result.error is not None else None
        published_ms = delivery.record.timestamp  # -1: the record has no timestamp
        latency_s = time.time() - published_ms / 1000 if published_ms >= 0 else None
        self._metrics.record_result(result.task, result.status, code, result.cache_hit, latency_s)
        log.info(
            "request_answered",
            status=result.status,
            cache_hit=result.cache_hit,
            error=code,
            total_ms=result.timings_ms.total,
        )
