import pytest

from zimage_stream.settings import BatchSettings, Settings
from zimage_stream.styles import STYLE_NAMES, STYLE_PROMPTS, style_prompt


def test_every_preset_turns_into_distinct_prompt_text() -> None:
    assert len(STYLE_NAMES) == 8
    texts = {style_prompt("a leather bag", name) for name in STYLE_NAMES}
    assert len(texts) == 8
    for name in STYLE_NAMES:
        text = style_prompt("a leather bag.", name)
        assert text.startswith("a leather bag, ") and STYLE_PROMPTS[name] in text


def test_no_style_keeps_the_prompt_and_unknown_style_is_an_error() -> None:
    assert style_prompt("a leather bag", None) == "a leather bag"
    with pytest.raises(ValueError, match="minimal_white"):
        style_prompt("x", "vaporwave")


def test_settings_read_the_contract_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "ZIMAGE_KAFKA_BOOTSTRAP_SERVERS": "kafka:9092",
        "ZIMAGE_REQUESTS_TOPIC": "req",
        "ZIMAGE_RESULTS_TOPIC": "res",
        "ZIMAGE_DLQ_TOPIC": "dlq",
        "ZIMAGE_GROUP_ID": "g",
        "ZIMAGE_REDIS_URL": "redis://r:6379/0",
        "ZIMAGE_STORAGE_URL": "s3://bucket/prefix",
        "ZIMAGE_MODEL": "/models/z",
        "ZIMAGE_DEVICE": "cpu",
        "ZIMAGE_BATCH_WINDOW_MS": "20",
        "ZIMAGE_MAX_BATCH_SIZE": "4",
        "ZIMAGE_CACHE_TTL_S": "60",
        "ZIMAGE_INFERENCE_TIMEOUT_S": "12.5",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s = Settings()
    assert s.kafka.bootstrap_servers == "kafka:9092"
    assert (s.kafka.requests_topic, s.kafka.results_topic, s.kafka.dlq_topic) == (
        "req",
        "res",
        "dlq",
    )
    assert s.kafka.group_id == "g" and s.cache.redis_url == "redis://r:6379/0"
    assert s.storage.url == "s3://bucket/prefix" and s.engine.model == "/models/z"
    assert s.engine.device == "cpu" and s.engine.inference_timeout_s == 12.5
    assert (s.batch.window_ms, s.batch.max_batch_size, s.cache.ttl_s) == (20, 4, 60)


def test_defaults_are_the_contract_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("ZIMAGE_"):
            monkeypatch.delenv(name)
    s = Settings()
    assert s.kafka.requests_topic == "zimage.requests"
    assert s.kafka.results_topic == "zimage.results"
    assert s.kafka.dlq_topic == "zimage.requests.dlq"
    assert s.engine.model == "Tongyi-MAI/Z-Image-Turbo" and s.engine.dtype == "bfloat16"
    assert s.engine.device == "auto" and s.cache.ttl_s == 86_400
    assert s.engine.inference_timeout_s == 30


def test_invalid_settings_fail_with_the_variable_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZIMAGE_DEVICE", "tpu")
    with pytest.raises(ValueError, match="device"):
        Settings()


def test_each_setting_is_declared_once_and_every_section_can_be_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    names = Settings.flat_names()
    sections = [section.flat_names() for section in Settings.SECTIONS.values()]
    assert sum(len(flat) for flat in sections) + 2 == len(names)  # + shutdown grace, HTTP port
    # Two settings that could not be set from the environment before:
    monkeypatch.setenv("ZIMAGE_KAFKA_CLIENT_ID", "worker-7")
    monkeypatch.setenv("ZIMAGE_WARMUP_SIZE", "512")
    s = Settings()
    assert s.kafka.client_id == "worker-7" and s.engine.warmup_size == 512
    # Bounds live with the setting, in its section: a section built alone checks them too.
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchSettings(max_batch_size=0)
    with pytest.raises(ValueError, match="warmup_size"):
        Settings(_env_file=None, warmup_size=8)  # type: ignore[call-arg]


def test_settings_round_trip_through_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings(_env_file=None, batch_window_ms=7, model="tiny", redis_url="redis://x")  # type: ignore[call-arg]
    assert s.replace(http_port=9).flat() == {**s.flat(), "http_port": 9}
    with pytest.raises(ValueError, match="not settings"):
        s.replace(batch_window=1)
    for name, value in s.environment().items():
        monkeypatch.setenv(name, value)
    assert Settings() == s
