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

from larder.storage.base import Storage
from larder.storage.disk import DiskStorage
from tests.service.conftest import Live
from tests.service.test_fastpath_nar import push

CONTENTS = os.urandom(8 << 20)


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return DiskStorage(tmp_path / "store")


def slow_download(port: int, target: str, received: list[bytes]) -> None:
    """GET ``target`` with a small receive buffer, 64 KiB every 10 ms, until the server closes."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        sock.settimeout(20)
        while data := sock.recv(64 * 1024):
            received.append(data)
            time.sleep(0.01)


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
