"""structlog set-up: JSON lines for machines, console rendering for people."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(json_logs: bool | None = None, level: str = "INFO") -> None:
    """Configure structlog (and route stdlib logs through the same level)."""
    if json_logs is None:
        json_logs = not sys.stderr.isatty()
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json_logs else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    for noisy in ("diffusers", "transformers", "aiokafka"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
