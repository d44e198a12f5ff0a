"""Everything a process writes to stderr is structured: the libraries' standard-library
logs, warnings and an uncaught exception included, with the request's context."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
from structlog.testing import capture_logs

from zimage_stream.logs import request_context, trace_id
from zimage_stream.worker import Worker

PROGRAM = """
import logging, warnings
from structlog.contextvars import bound_contextvars
from zimage_stream.logs import configure_logging, request_context
configure_logging(json_logs=True)
with bound_contextvars(**request_context("r-1", "generate", [("traceparent", b"%s")])):
    logging.getLogger("aiokafka").error("Unable connect to %%r", "kafka:9092")
    warnings.warn("a library's warning")
    raise RuntimeError("boom")
"""
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_library_logs_warnings_and_tracebacks_are_json_lines_with_the_context() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM % TRACEPARENT], capture_output=True, text=True
    )
    assert out.returncode == 1
    events = [json.loads(line) for line in out.stderr.splitlines()]  # each line is JSON
    library, warning, crash = events
    assert library["logger"] == "aiokafka" and library["level"] == "error"
    assert library["event"] == "Unable connect to 'kafka:9092'"
    assert library["request_id"] == "r-1" and library["task"] == "generate"
    assert library["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert warning["logger"] == "py.warnings" and "a library's warning" in warning["event"]
    assert crash["event"] == "uncaught_exception" and crash["level"] == "critical"
    assert "RuntimeError: boom" in crash["exception"]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (TRACEPARENT.encode(), "4bf92f3577b34da6a3ce929d0e0e4736"),
        (TRACEPARENT, "4bf92f3577b34da6a3ce929d0e0e4736"),
        (b"00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),
        (b"not a trace", None),
        (b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", None),
        (None, None),
    ],
)
def test_the_trace_id_is_read_from_a_valid_traceparent(
    header: bytes | str | None, expected: str | None
) -> None:
    assert trace_id(header) == expected


def test_a_request_without_headers_has_no_trace() -> None:
    assert request_context("r", "erase_text") == {
        "request_id": "r",
        "task": "erase_text",
        "trace_id": None,
    }


async def test_a_background_task_that_fails_is_logged_with_its_traceback() -> None:
    async def fails() -> None:
        raise OSError("disk full")

    finished = asyncio.Event()
    with capture_logs() as logs:
        Worker._spawn(SimpleNamespace(_tasks=set()), fails(), finished.set)  # type: ignore[arg-type]
        await finished.wait()  # set in the same callback that logs, just before
    (failed,) = [e for e in logs if e["event"] == "task_failed"]
    assert isinstance(failed["exc_info"], OSError)
    assert failed["exc_info"].__traceback__ is not None
