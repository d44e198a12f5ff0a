"""The worker's stderr as an operator's log collector reads it: every line structured, and
every line about a request names the request, its task and its trace."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

from tests.integration.conftest import KafkaIO, generate, start_worker_process, wait_for_ids
from zimage_stream.settings import Settings

TRACE = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE}-b7ad6b7169203331-01".encode()


async def test_every_line_is_json_and_each_request_is_traceable(
    settings: Settings, kafka_io: KafkaIO, tmp_path: Path
) -> None:
    log_path = tmp_path / "worker.log"
    worker = await start_worker_process(settings.replace(http_port=-1), log_path)
    try:
        headers = [("traceparent", TRACEPARENT)]
        await kafka_io.send(generate("logs-1", "a linen apron"), headers=headers)
        await wait_for_ids(kafka_io, {"logs-1"}, timeout_s=180)
        await kafka_io.send(generate("logs-2", "a linen apron"), headers=headers)  # a cache hit
        await kafka_io.send({**generate("logs-3"), "task": "upscale"}, headers=headers)
        await kafka_io.send(generate("logs-4", "a felt hat", width=300))  # no traceparent
        await wait_for_ids(kafka_io, {"logs-2", "logs-3", "logs-4"}, timeout_s=180)
    finally:
        worker.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(worker.wait(), timeout=60)
    text = log_path.read_text()
    assert code == 0, text[-2000:]
    events = []
    for line in text.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a structured line: {line!r}") from None
    answered = {e["request_id"]: e for e in events if e["event"] == "request_answered"}
    assert answered["logs-1"]["status"] == "succeeded" and not answered["logs-1"]["cache_hit"]
    assert answered["logs-2"]["cache_hit"] is True
    assert answered["logs-3"]["status"] == "rejected" and answered["logs-3"]["task"] is None
    assert answered["logs-4"]["error"] == "invalid_request"
    for event in events:
        if event.get("request_id") in ("logs-1", "logs-2"):
            assert event["task"] == "generate" and event["trace_id"] == TRACE, event
        if event.get("request_id") == "logs-4":
            assert event["task"] == "generate" and event["trace_id"] is None, event
    (batch,) = [e for e in events if e["event"] == "batch_done"]
    assert batch["request_ids"] == ["logs-1"]
    dead_lettered = [e for e in events if e["event"] == "dead_lettered"]
    assert sorted(e.get("request_id") for e in dead_lettered) == ["logs-3", "logs-4"]
