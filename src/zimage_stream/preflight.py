"""Checks a worker makes before it loads the model: can it reach the broker, Redis and the
object storage its settings name? Loading a model takes minutes; a mistyped broker address
should cost seconds and one line, not a warm-up and a traceback.

Each failure is a :class:`ServiceUnreachable` whose message names the setting to fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from aiokafka import AIOKafkaClient
from aiokafka.errors import (
    AuthenticationFailedError,
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)

from .kafka_security import security_options
from .settings import CacheSettings, KafkaSettings, Settings

if TYPE_CHECKING:  # the storage's stack (obstore) is the worker's, not the client's
    from .storage import Storage

#: how long each service may take to answer
TIMEOUT_S = 10.0


class ServiceUnreachable(Exception):
    """A service the settings name cannot be used; the message says which setting."""


async def check_services(
    settings: Settings, storage: Storage, timeout_s: float = TIMEOUT_S
) -> None:
    """Check the broker, Redis (when set) and storage at once; raise
    :class:`ServiceUnreachable` naming every one that failed."""
    outcomes = await asyncio.gather(
        check_broker(settings.kafka, timeout_s),
        check_redis(settings.cache, timeout_s),
        check_storage(storage, timeout_s),
        return_exceptions=True,
    )
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    for failure in failures:
        if not isinstance(failure, ServiceUnreachable):
            raise failure
    if failures:
        raise ServiceUnreachable("; ".join(str(f) for f in failures))


async def check_broker(settings: KafkaSettings, timeout_s: float = TIMEOUT_S) -> None:
    """Fetch the cluster's metadata once from ``ZIMAGE_KAFKA_BOOTSTRAP_SERVERS``."""
    where = f"ZIMAGE_KAFKA_BOOTSTRAP_SERVERS={settings.bootstrap_servers}"
    protocol = settings.security_protocol
    try:
        options = security_options(settings)  # its errors name their own variables
        client = AIOKafkaClient(
            bootstrap_servers=settings.bootstrap_servers,
            request_timeout_ms=int(timeout_s * 1000),
            **options,
        )
    except (KafkaError, ValueError, OSError) as exc:
        raise ServiceUnreachable(str(exc)) from None
    try:
        with _quiet("aiokafka"):  # its "Unable connect" lines: the one below says it all
            await asyncio.wait_for(client.bootstrap(), timeout_s)
    except (TimeoutError, KafkaConnectionError):
        hint = "is the address right, and the broker running?"
        if protocol != "PLAINTEXT":
            hint = (
                "is the address right, the broker running, and its listener"
                f" ZIMAGE_KAFKA_SECURITY_PROTOCOL={protocol}?"
            )
        raise ServiceUnreachable(f"{where}: no broker answered there ({hint})") from None
    except (AuthenticationFailedError, SaslAuthenticationFailed, UnsupportedSaslMechanismError):
        raise ServiceUnreachable(
            f"ZIMAGE_KAFKA_SASL_MECHANISM={settings.sasl_mechanism}, ZIMAGE_KAFKA_SASL_USERNAME="
            f"{settings.sasl_username}: the broker refused these credentials"
        ) from None
    except (KafkaError, ValueError, OSError) as exc:
        raise ServiceUnreachable(f"{where}: cannot use the broker ({exc!r})") from None
    finally:
        await client.close()


async def check_redis(settings: CacheSettings, timeout_s: float = TIMEOUT_S) -> None:
    """Ping ``ZIMAGE_REDIS_URL`` (nothing to check when it is empty)."""
    if not settings.redis_url:
        return
    import redis.asyncio as redis
    from redis.exceptions import RedisError

    where = f"ZIMAGE_REDIS_URL={_without_password(settings.redis_url)}"
    try:
        client = redis.from_url(
            settings.redis_url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
        )
    except ValueError as exc:
        raise ServiceUnreachable(f"{where}: {exc}") from None
    try:
        await asyncio.wait_for(client.ping(), timeout_s)
    except TimeoutError:
        raise ServiceUnreachable(f"{where}: Redis did not answer within {timeout_s:g} s") from None
    except (RedisError, OSError, ValueError) as exc:
        raise ServiceUnreachable(f"{where}: cannot reach Redis ({exc})") from None
    finally:
        await client.aclose()


async def check_storage(storage: Storage, timeout_s: float = TIMEOUT_S) -> None:
    """List the images' folder of ``ZIMAGE_STORAGE_URL`` once."""
    try:
        await asyncio.wait_for(storage.check(), timeout_s)
    except TimeoutError:
        message = f"no answer within {timeout_s:g} s"
        raise ServiceUnreachable(f"ZIMAGE_STORAGE_URL={storage.location}: {message}") from None
    except Exception as exc:  # obstore raises its own hierarchy; all mean "not usable"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise ServiceUnreachable(f"ZIMAGE_STORAGE_URL={storage.location}: {first}") from None


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    stdlib = logging.getLogger(logger)
    was = stdlib.disabled
    stdlib.disabled = True
    try:
        yield
    finally:
        stdlib.disabled = was


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
