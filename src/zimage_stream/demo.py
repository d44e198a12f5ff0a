"""``zimage-stream demo``: the whole flow on one machine with no services installed.

It starts the embedded broker on a free loopback port, runs a worker (miniature model,
local folder storage, in-process cache) in this process, submits one styled generate
request, prints the result and the paths of its images, then stops everything it started.
"""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

from .broker import FETCH_MAX_WAIT_MS, EmbeddedBroker
from .client import ZImageClient, new_request_id
from .settings import Settings
from .testing import running_worker


async def run_demo(settings: Settings, prompt: str, style: str, size: int) -> int:
    """Run the demo; returns the process exit code (0 when the request succeeded)."""
    with EmbeddedBroker() as broker:
        settings = settings.replace(
            kafka_bootstrap_servers=broker.bootstrap_servers,
            kafka_fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        )
        _say(f"broker: Tansu on {broker.bootstrap_servers}")
        _say(f"model: {settings.engine.model} ({settings.engine.dtype}); loading and warming up")
        # A real model may first be downloaded: the worker gets long to become ready.
        async with running_worker(settings, ready_timeout_s=3600) as worker:
            report = worker.engine.report
            _say(f"ready: device={report.device} load={report.load_s}s warm-up={report.warmup_s}s")
            request_id = new_request_id()
            async with ZImageClient(settings=settings.kafka, timeout_s=900) as client:
                _say(f"submitting {request_id}: {prompt!r} style={style} {size}x{size}")
                result = await client.generate(
                    prompt, style=style, width=size, height=size, request_id=request_id
                )
    print(result.model_dump_json(indent=2))
    for image in result.images:
        print(_local_path(image.uri))
    return 0 if result.status == "succeeded" else 1


def _local_path(uri: str) -> str:
    parsed = urlparse(uri)
    return str(Path(unquote(parsed.path))) if parsed.scheme == "file" else uri


def _say(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)
