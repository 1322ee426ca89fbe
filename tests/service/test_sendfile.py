"""Blobs on disk leave by sendfile(2) on uvloop too: the bytes, ranges, and the stall limit."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import socket
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvloop
import zstandard
from aiohttp import web

from larder.protocol import nix32
from larder.protocol.nar import write_nar
from larder.protocol.tokens import Scope
from larder.service import state
from larder.service.app import build_app
from larder.service.config import Config
from larder.service.observability.access_log import LineSink
from larder.service.routes import bodies as transfer
from larder.service.server import start
from larder.storage.disk import DiskStorage

SIZE = 6 * 1024 * 1024


def blob_file(tmp_path: Path) -> Path:
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(SIZE))
    return path


async def request(port: int, head: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.encode() + b"Host: x\r\nConnection: close\r\n\r\n" + body)
    status = int((await reader.readline()).split()[1])
    headers = {}
    while (line := await reader.readline()) != b"\r\n":
        name, _, value = line.decode().partition(":")
        headers[name.lower()] = value.strip()
    data = await reader.read()
    writer.close()
    return status, headers, data


@contextlib.asynccontextmanager
async def serving_nar(
    tmp_path: Path, nar: bytes, sndbuf: int = 0
) -> AsyncIterator[tuple[web.Application, int, str]]:
    """A server on disk storage holding ``nar`` (sent as ``.nar``, stored as zstd): the
    application, its port and the NAR's URL; ``sndbuf``: its connections' send buffer."""
    config = Config()
    app = build_app(config, DiskStorage(tmp_path / "data"))
    sock = socket.socket()
    if sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    running = await start(config, app, sock, LineSink(io.StringIO()))
    try:
        await app[state.CACHES].ensure("main")
        token, _ = await app[state.TOKENS].issue("main", Scope.WRITE, 60)
        digest = nix32.encode(hashlib.sha256(nar).digest())
        head = f"PUT /main/nar/{digest}.nar HTTP/1.1\r\nAuthorization: Bearer {token}\r\n"
        status, _, _ = await request(port, f"{head}Content-Length: {len(nar)}\r\n", nar)
        assert status == 200
        yield app, port, f"/main/nar/{digest}.nar.zst"
    finally:
        await running.stop()


def test_nar_zst_goes_out_by_sendfile_on_uvloop(tmp_path: Path) -> None:
    calls: list[int] = []
    real = transfer.send_file

    async def counted(*args: object) -> int:
        calls.append(int(args[4]))  # type: ignore[call-overload]
        return await real(*args)  # type: ignore[arg-type]

    contents = os.urandom(3 * 1024 * 1024)
    nar = write_nar({"type": "regular", "contents": contents})

    async def main() -> None:
        async with serving_nar(tmp_path, nar) as (_, port, url):
            status, headers, body = await request(port, f"GET {url} HTTP/1.1\r\n")
            assert status == 200 and headers["accept-ranges"] == "bytes"
            assert int(headers["content-length"]) == len(body)
            assert zstandard.ZstdDecompressor().decompressobj().decompress(body) == nar
            status, headers, part = await request(
                port, f"GET {url} HTTP/1.1\r\nRange: bytes=10-1009\r\n"
            )
            assert status == 206 and part == body[10:1010]
            assert headers["content-range"] == f"bytes 10-1009/{len(body)}"

    transfer.send_file = counted  # type: ignore[assignment]
    try:
        uvloop.run(main())
    finally:
        transfer.send_file = real
    assert len(calls) == 2 and calls[1] == 1000


def test_a_file_response_counts_the_bytes_sendfile_sent(tmp_path: Path) -> None:
    """A NAR the application sends by sendfile (a range: the short path leaves it) counts the
    body bytes that went out: all of them when read to the end, about what the connection
    held when the client left after 1 KB, not the declared length."""
    nar = write_nar({"type": "regular", "contents": os.urandom(SIZE)})

    async def main() -> None:
        async with serving_nar(tmp_path, nar, sndbuf=64 * 1024) as (app, port, url):
            sent = app[state.METRICS].sent.labels("main", "nix")
            before = sent._value.get()
            status, _, body = await request(port, f"GET {url} HTTP/1.1\r\nRange: bytes=0-\r\n")
            assert status == 206 and len(body) > SIZE
            assert sent._value.get() - before == len(body)

            before = sent._value.get()
            client = socket.socket()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.connect(("127.0.0.1", port))
            try:
                client.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-\r\n\r\n".encode())
                assert (await asyncio.to_thread(client.recv, 1024)).startswith(b"HTTP/1.1 206")
                await asyncio.sleep(0.5)  # the server fills what the connection holds
            finally:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00" + bytes(6))
                client.close()
            await asyncio.sleep(0.5)
            assert 0 < sent._value.get() - before < len(body) // 4

    uvloop.run(main())


def test_send_file_waits_for_a_slow_reader_and_delivers_every_byte(tmp_path: Path) -> None:
    path = blob_file(tmp_path)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    received = bytearray()

    def slow_reader() -> None:
        while chunk := theirs.recv(64 * 1024):
            received.extend(chunk)
            if len(received) < SIZE // 2:
                threading.Event().wait(0.001)

    thread = threading.Thread(target=slow_reader)
    thread.start()

    async def main() -> None:
        with path.open("rb") as file:
            await transfer.send_file(asyncio.get_running_loop(), ours.fileno(), file.fileno(),
                                     100, SIZE - 100, idle=5)  # fmt: skip
        ours.close()

    uvloop.run(main())
    thread.join()
    theirs.close()
    assert bytes(received) == path.read_bytes()[100:]


def test_send_file_waits_for_a_steady_slow_reader_however_long_the_socket_is_full(
    tmp_path: Path,
) -> None:
    """A socket takes more only once much of its queue has left: a client reading steadily,
    slower than that refills it, went without any sendfile progress for longer than ``idle``
    and was cut off, though it never stopped taking bytes."""
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(1024 * 1024))
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 * 1024)
    ours.setblocking(False)
    received = bytearray()

    def steady_reader() -> None:
        while chunk := theirs.recv(16 * 1024):
            received.extend(chunk)
            threading.Event().wait(0.05)  # about 320 KiB/s

    thread = threading.Thread(target=steady_reader)
    thread.start()

    async def main() -> None:
        with path.open("rb") as file:
            size = os.fstat(file.fileno()).st_size
            await transfer.send_file(
                asyncio.get_running_loop(), ours.fileno(), file.fileno(), 0, size, idle=0.5
            )

    try:
        uvloop.run(main())
    finally:
        ours.close()
        thread.join()
        theirs.close()
    assert bytes(received) == path.read_bytes()


def test_send_file_gives_up_on_a_client_that_takes_nothing(tmp_path: Path) -> None:
    path = blob_file(tmp_path)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)

    async def main() -> None:
        with path.open("rb") as file:
            await transfer.send_file(asyncio.get_running_loop(), ours.fileno(), file.fileno(),
                                     0, SIZE, idle=0.2)  # fmt: skip

    with pytest.raises(ConnectionResetError, match="took nothing"):
        uvloop.run(main())
    ours.close()
    theirs.close()


def test_send_file_fails_when_the_client_goes_away_mid_body(tmp_path: Path) -> None:
    path = blob_file(tmp_path)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)

    def leave_early() -> None:
        theirs.recv(64 * 1024)
        theirs.close()

    thread = threading.Thread(target=leave_early)
    thread.start()

    async def main() -> None:
        with path.open("rb") as file:
            await transfer.send_file(asyncio.get_running_loop(), ours.fileno(), file.fileno(),
                                     0, SIZE, idle=30)  # fmt: skip

    with pytest.raises(OSError) as caught:
        uvloop.run(main())
    assert "took nothing" not in str(caught.value)  # the error itself, not the idle deadline
    thread.join()
    ours.close()
