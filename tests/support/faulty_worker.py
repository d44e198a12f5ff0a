"""``zimage-stream worker`` whose engine process injects faults, for tests that kill the
worker itself: ``python -m tests.support.faulty_worker '{"kill_worker_on": "KILL"}'``
with the ``ZIMAGE_*`` environment of the settings to serve."""

from __future__ import annotations

import asyncio
import json
import signal
import sys

from zimage_stream.engine.calls import Faults
from zimage_stream.engine_process import EngineProcess
from zimage_stream.logs import configure_logging
from zimage_stream.settings import Settings
from zimage_stream.worker import Worker


async def serve(faults: Faults) -> None:
    settings = Settings()
    worker = Worker(settings, engine=EngineProcess(settings.engine, settings.ocr, faults))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    await worker.run()


if __name__ == "__main__":
    configure_logging()
    asyncio.run(serve(Faults(**json.loads(sys.argv[1]))))
