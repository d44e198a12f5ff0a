"""Kafka client options for TLS and SASL, from ``ZIMAGE_KAFKA_SECURITY_PROTOCOL`` and friends.

Every client this project makes (the worker's consumer and producer, the topic admin, the
CLI's publisher and result reader) takes these options, so a secured cluster needs only
the settings."""

from __future__ import annotations

import ssl
from typing import Any

from aiokafka.helpers import create_ssl_context

from .settings import KafkaSettings


def security_options(settings: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments for an aiokafka client; empty for ``PLAINTEXT``."""
    protocol = settings.security_protocol
    if protocol == "PLAINTEXT":
        return {}
    options: dict[str, Any] = {"security_protocol": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = _ssl_context(settings)
    if protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        if not settings.sasl_username or settings.sasl_password is None:
            raise ValueError(
                f"ZIMAGE_KAFKA_SECURITY_PROTOCOL={protocol} needs ZIMAGE_KAFKA_SASL_USERNAME "
                "and ZIMAGE_KAFKA_SASL_PASSWORD"
            )
        options.update(
            sasl_mechanism=settings.sasl_mechanism,
            sasl_plain_username=settings.sasl_username,
            sasl_plain_password=settings.sasl_password,
        )
    return options


def _ssl_context(settings: KafkaSettings) -> ssl.SSLContext:
    if (settings.ssl_certfile is None) != (settings.ssl_keyfile is None):
        raise ValueError(
            "mutual TLS needs both ZIMAGE_KAFKA_SSL_CERTFILE and ZIMAGE_KAFKA_SSL_KEYFILE"
        )
    files = {
        "ZIMAGE_KAFKA_SSL_CAFILE": settings.ssl_cafile,
        "ZIMAGE_KAFKA_SSL_CERTFILE": settings.ssl_certfile,
        "ZIMAGE_KAFKA_SSL_KEYFILE": settings.ssl_keyfile,
    }
    for variable, path in files.items():
        if path is not None and not path.is_file():
            raise ValueError(f"{variable}={path}: no such file")
    try:
        return create_ssl_context(
            cafile=str(settings.ssl_cafile) if settings.ssl_cafile else None,
            certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
            keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
        )
    except (OSError, ssl.SSLError) as exc:  # not PEM, or a key that is not the cert's
        named = " / ".join(f"{v}={p}" for v, p in files.items() if p is not None)
        raise ValueError(f"{named}: cannot load ({exc})") from None
