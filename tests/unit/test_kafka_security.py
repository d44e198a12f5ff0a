"""Kafka TLS/SASL options built from the settings (no secured broker runs here)."""

from __future__ import annotations

import re
import ssl
from pathlib import Path

import certifi
import pytest

from tests.conftest import make_settings
from zimage_stream.kafka_security import security_options
from zimage_stream.preflight import ServiceUnreachable, check_broker


def test_plaintext_adds_nothing() -> None:
    assert security_options(make_settings().kafka) == {}


def test_sasl_over_tls_builds_a_verifying_context_and_credentials() -> None:
    settings = make_settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="worker",
        kafka_sasl_password="s3cret",
        kafka_ssl_cafile=Path(certifi.where()),
    )
    options = security_options(settings.kafka)
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == ("worker", "s3cret")
    context = options["ssl_context"]
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED
    assert "s3cret" not in repr(settings)  # the password stays out of logs


def test_incomplete_security_settings_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="SASL_USERNAME"):
        security_options(make_settings(kafka_security_protocol="SASL_PLAINTEXT").kafka)
    half_mtls = make_settings(
        kafka_security_protocol="SSL", kafka_ssl_certfile=Path(certifi.where())
    )
    with pytest.raises(ValueError, match="KEYFILE"):
        security_options(half_mtls.kafka)


def test_a_tls_file_that_is_missing_or_not_pem_is_named_by_its_variable(tmp_path: Path) -> None:
    missing = make_settings(kafka_security_protocol="SSL", kafka_ssl_cafile=tmp_path / "ca.pem")
    with pytest.raises(
        ValueError, match=re.escape(f"ZIMAGE_KAFKA_SSL_CAFILE={tmp_path}/ca.pem: no such")
    ):
        security_options(missing.kafka)
    (tmp_path / "ca.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match=r"^ZIMAGE_KAFKA_SSL_CAFILE=.*cannot load"):
        security_options(missing.kafka)


async def test_the_broker_check_names_the_security_setting_not_the_address(
    tmp_path: Path,
) -> None:
    tls = make_settings(kafka_security_protocol="SSL", kafka_ssl_cafile=tmp_path / "ca.pem")
    with pytest.raises(ServiceUnreachable) as info:
        await check_broker(tls.kafka, timeout_s=1)
    assert str(info.value).startswith("ZIMAGE_KAFKA_SSL_CAFILE=")
    sasl = make_settings(kafka_security_protocol="SASL_PLAINTEXT")
    with pytest.raises(ServiceUnreachable) as info:
        await check_broker(sasl.kafka, timeout_s=1)
    assert str(info.value).startswith("ZIMAGE_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT needs")
