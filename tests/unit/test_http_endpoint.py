"""The worker's HTTP endpoint holds a bounded number of connections: idle ones cannot take
the worker's file handles, and a scrape is answered once they time out."""

from __future__ import annotations

import asyncio

from zimage_stream.metrics import HttpEndpoint, json_response

LIMIT, READ_TIMEOUT_S = 4, 0.5


async def _get(port: int, path: str) -> bytes:
    """The whole answer, or b"" when the endpoint closed the connection unanswered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: worker\r\n\r\n".encode())
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout=2)
    except ConnectionError:
        return b""
    finally:
        writer.close()


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), timeout=seconds) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


async def test_idle_connections_past_the_limit_are_closed_at_once() -> None:
    routes = {"/healthz": lambda: json_response(200, {"alive": True})}
    endpoint = HttpEndpoint(
        0, routes, host="127.0.0.1", max_connections=LIMIT, read_timeout_s=READ_TIMEOUT_S
    )
    await endpoint.start()
    try:
        idle = [await asyncio.open_connection("127.0.0.1", endpoint.port) for _ in range(LIMIT)]
        extra = [await asyncio.open_connection("127.0.0.1", endpoint.port) for _ in range(3)]
        closed = [await _closed_within(reader, READ_TIMEOUT_S / 3) for reader, _ in extra]
        assert closed == [True] * 3, "connections past the limit must be closed at once"
        assert await _get(endpoint.port, "/healthz") == b"", "still full: refused, not queued"
        # The idle ones time out (the per-read timeout); then a scrape is answered.
        assert all([await _closed_within(reader, 2 * READ_TIMEOUT_S) for reader, _ in idle])
        answer = await _get(endpoint.port, "/healthz")
        assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b'{"alive": true}')
        for _, writer in idle + extra:
            writer.close()
    finally:
        await endpoint.stop()
