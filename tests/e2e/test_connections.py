"""Clients that hold connections (slow request heads, too many connections) against a real
``larder serve``: they are cut off, and other clients are still served."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path

from tests.e2e.harness import larder_server

SLOW_CLIENTS = 200
HEADER_TIMEOUT = 2.0


async def _close(writers: list[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.close()
    await asyncio.gather(*(writer.wait_closed() for writer in writers), return_exceptions=True)


RESET = b"(connection reset)"


async def _read_reply(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (:data:`RESET` when a byte
    the client sent crossed the server's close, so that the kernel reset the connection)."""
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:
        return RESET


async def _slowloris(host: str, port: int, url: str) -> tuple[list[bytes], float, float]:
    """SLOW_CLIENTS connections sending a request head one byte a second; meanwhile one normal
    request. Returns what each slow connection got, the normal request's time, and how long
    the slow connections lasted in all."""
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 60 + b"\r\n\r\n"
    streams = [await asyncio.open_connection(host, port) for _ in range(SLOW_CLIENTS)]
    start = time.monotonic()

    async def drip(writer: asyncio.StreamWriter) -> None:
        for byte in head:
            if writer.is_closing():
                return
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except ConnectionError:
                return
            await asyncio.sleep(1.0)

    drips = [asyncio.create_task(drip(writer)) for _, writer in streams]
    await asyncio.sleep(0.5)  # every slow client has started its head
    normal_start = time.monotonic()
    status = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=30).status)
    normal = time.monotonic() - normal_start
    assert status == 200
    replies = await asyncio.gather(
        *(_read_reply(reader, HEADER_TIMEOUT + 10) for reader, _ in streams)
    )
    lasted = time.monotonic() - start
    for task in drips:
        task.cancel()
    await _close([writer for _, writer in streams])
    return replies, normal, lasted


def test_slow_request_heads_are_cut_off_and_others_are_served(tmp_path: Path) -> None:
    env = {"LARDER_HEADER_TIMEOUT": str(HEADER_TIMEOUT)}
    with larder_server(str(tmp_path / "data"), tmp_path, env) as server:
        host, port = server.url.removeprefix("http://").split(":")
        replies, normal, lasted = asyncio.run(_slowloris(host, int(port), f"{server.url}/healthz"))
    assert normal < HEADER_TIMEOUT, f"a normal request waited {normal:.2f}s behind slow clients"
    assert all(reply.startswith(b"HTTP/1.1 408 ") or reply == RESET for reply in replies), set(
        replies
    )
    # Each head would take over 80 s at a byte a second; they were all closed at the timeout.
    assert lasted < HEADER_TIMEOUT + 5, lasted


def test_idle_keep_alive_is_not_a_slow_head(tmp_path: Path) -> None:
    env = {"LARDER_HEADER_TIMEOUT": "1"}
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"

    async def two_requests(host: str, port: int) -> list[bytes]:
        reader, writer = await asyncio.open_connection(host, port)
        answers = []
        for pause in (0.0, 2.5):  # idle longer than header_timeout between the two requests
            await asyncio.sleep(pause)
            writer.write(request)
            await writer.drain()
            answers.append(await asyncio.wait_for(reader.readuntil(b"ok\n"), 5))
        await _close([writer])
        return answers

    with larder_server(str(tmp_path / "data"), tmp_path, env) as server:
        host, port = server.url.removeprefix("http://").split(":")
        answers = asyncio.run(two_requests(host, int(port)))
    assert [a.split(b"\r\n", 1)[0] for a in answers] == [b"HTTP/1.1 200 OK"] * 2


def test_connections_past_max_connections_get_503(tmp_path: Path) -> None:
    env = {"LARDER_MAX_CONNECTIONS": "20", "LARDER_HEADER_TIMEOUT": "60"}

    async def crowd(host: str, port: int) -> tuple[bytes, bytes]:
        held = [await asyncio.open_connection(host, port) for _ in range(20)]
        await asyncio.sleep(0.3)  # the server accepts all 20 (nothing outside shows when)
        reader, writer = await asyncio.open_connection(host, port)
        refused = await _read_reply(reader, 5)
        await _close([writer, *(held_writer for _, held_writer in held[:5])])
        await asyncio.sleep(0.3)  # the server sees the five closes (likewise unobservable)
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        served = await _read_reply(reader, 5)
        await _close([writer, *(held_writer for _, held_writer in held[5:])])
        return refused, served

    with larder_server(str(tmp_path / "data"), tmp_path, env) as server:
        host, port = server.url.removeprefix("http://").split(":")
        refused, served = asyncio.run(crowd(host, int(port)))
    assert refused.startswith(b"HTTP/1.1 503 "), refused
    assert b"Retry-After: 1\r\n" in refused
    assert served.startswith(b"HTTP/1.1 200 "), served


def test_a_stop_after_refused_expect_uploads_logs_no_error(tmp_path: Path) -> None:
    """A client refused at ``Expect: 100-continue`` closes without a body; aiohttp keeps its
    handler reading for one (10 s), and a stop meanwhile logged "Task was destroyed but it is
    pending!" at ERROR for each."""
    import socket

    with larder_server(str(tmp_path / "data"), tmp_path) as server:
        port = int(server.url.rsplit(":", 1)[1])
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port)) as conn:
                conn.sendall(
                    b"PUT /main/nix-cache-info HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                    b"Expect: 100-continue\r\n\r\n"
                )
                assert conn.recv(4096).startswith(b"HTTP/1.1 401 ")  # no token: no body sent
        time.sleep(0.5)
    log = server.log_path.read_text()
    assert log.count("PUT /main/nix-cache-info") == 3
    assert "Task was destroyed" not in log and " ERROR " not in log, log
