"""Creating the worker's topics when they do not exist yet."""

from __future__ import annotations

import contextlib
from typing import Any

import structlog
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from .kafka_security import security_options
from .settings import KafkaSettings

log = structlog.get_logger(__name__)


def client_topics(settings: KafkaSettings) -> list[str]:
    """The topics a client of the worker uses: requests, results and progress (when named)."""
    progress = [settings.progress_topic] if settings.progress_topic else []
    return [settings.requests_topic, settings.results_topic, *progress]


async def missing_topics(settings: KafkaSettings, topics: list[str]) -> list[str]:
    """Those of ``topics`` the broker does not have."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.bootstrap_servers, **security_options(settings)
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
    finally:
        await admin.close()
    return [t for t in topics if t not in existing]


async def ensure_topics(settings: KafkaSettings, partitions: int, **client_options: Any) -> None:
    """Create the requests, results and DLQ topics that are missing (existing ones are kept)."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.bootstrap_servers,
        **{**security_options(settings), **client_options},
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [*client_topics(settings), settings.dlq_topic]
        replicas = settings.topic_replication_factor
        missing = [NewTopic(t, partitions, replicas) for t in wanted if t not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # another worker was first
                await admin.create_topics(missing)
            log.info("topics_created", topics=[t.name for t in missing], partitions=partitions)
    except KafkaError as exc:
        log.warning("topic_creation_failed", error=repr(exc))
    finally:
        await admin.close()
