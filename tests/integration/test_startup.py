"""Start-up with a wrong setting, as an operator meets it: one line naming the setting,
exit code 2, no traceback, and the model is never loaded."""

from __future__ import annotations

from pathlib import Path

from tests.integration.conftest import run_cli
from zimage_stream.settings import Settings


def _one_clear_line(stderr: str, variable: str) -> str:
    errors = [line for line in stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, stderr
    assert variable in errors[0] and "Traceback" not in stderr, stderr
    assert "Unclosed" not in stderr, stderr
    return errors[0]


async def test_a_wrong_broker_address_fails_before_the_model_loads(settings: Settings) -> None:
    wrong = settings.replace(kafka_bootstrap_servers="127.0.0.1:1", http_port=-1)
    code, _, stderr = await run_cli(wrong, "worker")
    assert code == 2
    _one_clear_line(stderr, "ZIMAGE_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:1")
    assert "engine_process_started" not in stderr  # checked before the model


async def test_submit_to_a_wrong_broker_is_one_line(settings: Settings) -> None:
    wrong = settings.replace(kafka_bootstrap_servers="127.0.0.1:1")
    code, stdout, stderr = await run_cli(wrong, "submit", "a mug", "--wait")
    assert code == 2 and stdout == ""
    _one_clear_line(stderr, "ZIMAGE_KAFKA_BOOTSTRAP_SERVERS")


async def test_unreachable_redis_and_storage_are_named(
    settings: Settings, s3_endpoint: str
) -> None:
    wrong = settings.replace(
        redis_url="redis://127.0.0.1:1/0",
        storage_url="s3://no-such-bucket",
        s3_endpoint_url=s3_endpoint,
        s3_region="us-east-1",
        s3_access_key_id="testing",
        s3_secret_access_key="testing",
        http_port=-1,
    )
    code, _, stderr = await run_cli(wrong, "worker")
    assert code == 2
    line = _one_clear_line(stderr, "ZIMAGE_REDIS_URL=redis://127.0.0.1:1/0")
    assert "ZIMAGE_STORAGE_URL=s3://no-such-bucket" in line
    assert "ZIMAGE_KAFKA_BOOTSTRAP_SERVERS" not in line  # the broker is fine


async def test_a_model_that_cannot_be_loaded_is_one_line(
    settings: Settings, tmp_path: Path
) -> None:
    missing = settings.replace(model=str(tmp_path / "no-model-here"), http_port=-1)
    code, _, stderr = await run_cli(missing, "worker")
    assert code == 2
    line = _one_clear_line(stderr, "cannot load model")
    assert "no-model-here" in line


async def test_a_wrong_value_and_a_misspelt_name(settings: Settings) -> None:
    env = {"ZIMAGE_BATCH_WINDOW": "5", "ZIMAGE_MAX_BATCH_SIZE": "many"}
    code, _, stderr = await run_cli(settings, "worker", extra_env=env)
    assert code == 2
    _one_clear_line(stderr, "ZIMAGE_MAX_BATCH_SIZE=many")
    warning = next(line for line in stderr.splitlines() if "unknown_setting" in line)
    assert "ZIMAGE_BATCH_WINDOW" in warning and "ZIMAGE_BATCH_WINDOW_MS" in warning
