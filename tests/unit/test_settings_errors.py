"""What a wrong or misspelt ``ZIMAGE_*`` variable tells the operator."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from zimage_stream.settings import Settings, explain, unknown_variables


def test_a_misspelt_variable_is_named_with_the_nearest_setting() -> None:
    found = unknown_variables(
        ["ZIMAGE_BATCH_WINDOW", "ZIMAGE_KAFKA_BOOTSTRAP_SERVER", "ZIMAGE_MODEL", "PATH", "ZIMAGE_X"]
    )
    assert found == [
        ("ZIMAGE_BATCH_WINDOW", "ZIMAGE_BATCH_WINDOW_MS"),
        ("ZIMAGE_KAFKA_BOOTSTRAP_SERVER", "ZIMAGE_KAFKA_BOOTSTRAP_SERVERS"),
        ("ZIMAGE_X", None),
    ]


def test_every_real_variable_is_known() -> None:
    assert unknown_variables(Settings.variable_names()) == []


def test_a_wrong_value_names_its_variable_and_hides_secrets() -> None:
    with pytest.raises(ValidationError) as info:
        Settings(  # type: ignore[call-arg]
            _env_file=None, batch_window_ms="soon", kafka_sasl_password=5, http_port=70000
        )
    message = str(explain(info.value))
    assert "ZIMAGE_BATCH_WINDOW_MS=soon: Input should be a valid integer" in message
    assert "ZIMAGE_HTTP_PORT=70000" in message
    assert "ZIMAGE_KAFKA_SASL_PASSWORD:" in message and "5" not in message.split("PASSWORD")[1][:3]
    assert "\n" not in message
