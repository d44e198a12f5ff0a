"""structlog set-up: JSON lines for machines, console rendering for people.

Everything a process writes to stderr goes through here: structlog's own events, the
standard-library logs of the libraries (aiokafka, asyncio, diffusers, the hub client),
Python warnings and an uncaught exception's traceback (one event, the traceback in its
``exception`` field). Context bound with ``bound_contextvars`` (``request_id``, ``task``,
``trace_id``) is merged into every one of them, library lines too. Progress bars are for
a terminal only (:func:`progress_bars_wanted`).
"""

from __future__ import annotations

import logging
import sys
from types import TracebackType
from typing import Any

import structlog

#: libraries whose INFO lines are noise to an operator: their warnings still come through
_QUIET = (
    "aiokafka",
    "diffusers",
    "transformers",
    "huggingface_hub",
    "httpx",
    "urllib3",
    "filelock",
)


def configure_logging(json_logs: bool | None = None, level: str = "INFO") -> None:
    """Configure structlog, and route the standard library's logs, warnings and uncaught
    exceptions through the same renderer on stderr."""
    if json_logs is None:
        json_logs = not sys.stderr.isatty()
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json_logs else structlog.dev.ConsoleRenderer()
    )
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    _route_standard_logging(shared, renderer, level)
    sys.excepthook = _log_uncaught


def _route_standard_logging(
    shared: list[structlog.types.Processor], renderer: structlog.types.Processor, level: str
) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    handler.set_name("zimage-stream")
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == "zimage-stream":  # configured again: replace, never double
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(logging.getLevelName(level), logging.INFO))
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.captureWarnings(True)  # warnings.warn(...) becomes a py.warnings event


def _log_uncaught(
    kind: type[BaseException], error: BaseException, traceback: TracebackType | None
) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, error, traceback)
        return
    structlog.get_logger("zimage_stream").critical(
        "uncaught_exception", exc_info=(kind, error, traceback)
    )


def progress_bars_wanted() -> bool:
    """Progress bars (the hub's downloads, a library's loops) only on a terminal: in a log
    file or a collector they are noise between the JSON lines."""
    return sys.stderr.isatty()


def trace_id(traceparent: bytes | str | None) -> str | None:
    """The trace id of a W3C ``traceparent`` header (``00-<trace id>-<span id>-<flags>``),
    or None when there is no valid one."""
    if isinstance(traceparent, bytes):
        traceparent = traceparent.decode("ascii", errors="replace")
    parts = (traceparent or "").strip().split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or set(parts[1]) - set("0123456789abcdef"):
        return None
    return None if parts[1] == "0" * 32 else parts[1]


def request_context(
    request_id: str | None, task: str | None, headers: Any = ()
) -> dict[str, str | None]:
    """What every log line about one request carries: its id, task and trace id (from the
    record's ``traceparent`` header, when it has one)."""
    traceparent = next((v for k, v in headers if k == "traceparent"), None)
    return {"request_id": request_id, "task": task, "trace_id": trace_id(traceparent)}
