"""A stopping server lets the answers in progress end: a NAR download on the short path as one
the application sends, each delivered whole to a client that reads slowly."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path

import pytest

import larder.service.server as server_module
from larder.service.draining import unsent
from larder.storage.base import Storage
from larder.storage.disk import DiskStorage
from tests.service.conftest import Live
from tests.service.test_fastpath_nar import push

CONTENTS = os.urandom(8 << 20)


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return DiskStorage(tmp_path / "store")


def slow_download(port: int, target: str, received: list[bytes], pause: float = 0.01) -> None:
    """GET ``target`` with a small receive buffer, 64 KiB every ``pause`` seconds, until the
    server closes."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        sock.settimeout(20)
        while data := sock.recv(64 * 1024):
            received.append(data)
            time.sleep(pause)


@pytest.mark.parametrize("suffix", [".nar.zst", ".nar"])  # short path (sendfile), application
async def test_a_download_in_progress_ends_whole_when_the_server_stops(
    live: Live, suffix: str
) -> None:
    url = await push(live, "1" * 32, CONTENTS)
    target = url.removesuffix(".nar.zst") + suffix
    received: list[bytes] = []
    client = threading.Thread(target=slow_download, args=(live.port, target, received))
    client.start()
    await asyncio.sleep(0.3)
    await live.running.stop()
    await asyncio.to_thread(client.join, 30)
    head, _, body = b"".join(received).partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    assert length > 8 << 20 and len(body) == length
    # Nothing new is taken meanwhile.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", live.port), timeout=2).close()


async def test_idle_connections_close_at_once_while_a_download_goes_on(live: Live) -> None:
    """Held open until every download had ended, an idle keep-alive connection's next request
    went unanswered for as long (up to 25 s), then was reset."""
    url = await push(live, "2" * 32, CONTENTS)
    idle = await asyncio.open_connection("127.0.0.1", live.port)
    idle[1].write(
        f"GET {url.rsplit('/', 2)[0]}/nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    await idle[0].readuntil(b"\r\n\r\n")
    received: list[bytes] = []
    client = threading.Thread(target=slow_download, args=(live.port, url, received, 0.05))
    client.start()
    await asyncio.sleep(0.3)
    stopping = asyncio.ensure_future(live.running.stop())
    try:
        assert await asyncio.wait_for(idle[0].read(), 2) is not None  # EOF within 2 s
        assert not stopping.done()  # the download still goes on
    finally:
        idle[1].close()
        await stopping
        await asyncio.to_thread(client.join, 30)


async def test_a_client_that_reads_nothing_ends_at_the_deadline(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiohttp waits its shutdown timeout for a handler, then as long again once cancelled:
    a stop took twice the deadline with a client that reads nothing."""
    monkeypatch.setattr(server_module, "SHUTDOWN_TIMEOUT", 2.0)
    url = await push(live, "3" * 32, CONTENTS)
    sock = socket.create_connection(("127.0.0.1", live.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(f"GET {url.removesuffix('.zst')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await asyncio.sleep(0.5)  # the application is writing, and the client takes nothing
    started = time.monotonic()
    try:
        await asyncio.wait_for(live.running.stop(), 10)
    finally:
        sock.close()
    assert time.monotonic() - started < 3.5


async def test_a_connection_whose_answers_have_not_left_counts_as_sending() -> None:
    """Answers to pipelined requests a client reads slowly sit in the kernel's queue: closed
    then with requests unread, the connection is reset and they are lost."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
    try:
        assert not unsent(transport)
        transport.write(b"x" * (4 << 20))  # more than the kernel takes at once
        await asyncio.sleep(0.05)
        assert unsent(transport)
        theirs.setblocking(False)
        while True:
            try:
                if not theirs.recv(1 << 20):
                    break
            except BlockingIOError:
                if not unsent(transport):
                    break
                await asyncio.sleep(0.01)
        assert not unsent(transport)
    finally:
        transport.close()
        theirs.close()
