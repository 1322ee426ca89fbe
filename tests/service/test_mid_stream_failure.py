"""Storage failing after a download's headers went out: the connection closes at once, so the
client sees a short body (Nix retries) instead of waiting for bytes that never come."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from larder.errors import StorageUnavailable
from larder.protocol import nix32
from larder.storage.base import BlobReader
from larder.storage.memory import MemoryStorage
from tests.service.conftest import ServiceFactory
from tests.service.test_nix_routes import make_nar, nar_url


class _FailingReader(BlobReader):
    """Yields the first chunk of the real blob, then the storage 'goes away'."""

    def __init__(self, inner: BlobReader) -> None:
        self._inner = inner
        self.stored_size = inner.stored_size

    async def chunks(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        async for chunk in self._inner.chunks(start, end):
            yield chunk[: len(chunk) // 2]
            raise StorageUnavailable("S3 blob read failed: connection reset")

    async def close(self) -> None:
        await self._inner.close()


class FailingReads(MemoryStorage):
    failing = False

    async def blob_open(self, blob_id: str) -> BlobReader | None:
        reader = await super().blob_open(blob_id)
        return _FailingReader(reader) if reader is not None and self.failing else reader


@pytest.mark.parametrize("suffix", [".nar.zst", ".nar"])
async def test_a_download_cut_by_storage_closes_the_connection(
    make_service: ServiceFactory, suffix: str
) -> None:
    storage = FailingReads()
    service = await make_service(storage)
    nar = make_nar(os.urandom(300_000))
    resp = await service.client.put(f"/main/{nar_url(nar, '')}", data=nar, headers=service.auth())
    assert resp.status == 200
    storage.failing = True
    target = f"/main/nar/{nix32.encode(hashlib.sha256(nar).digest())}{suffix}"
    reader, writer = await asyncio.open_connection(service.client.host, service.client.port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())  # keep-alive
    await writer.drain()
    received = await asyncio.wait_for(reader.read(), 5)  # EOF, not a hang
    writer.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
                 .split(b":")[1])  # fmt: skip
    assert len(body) < length  # (a decoded .nar holds its last piece back: maybe none)
    assert b"HTTP/1.1" not in body  # no second response written into the body


async def test_an_upload_still_arriving_when_the_server_stops_is_answered_503(
    tmp_path: Path,
) -> None:
    """aiohttp reads no more of a connection once its shutdown began: the route waited for the
    rest of the body until the shutdown timeout (25 s) and the client got no answer at all."""
    from larder.protocol.tokens import Scope
    from larder.service import state
    from larder.service.app import build_app
    from larder.service.config import Config
    from larder.service.observability.access_log import LineSink
    from larder.service.server import start
    from larder.storage.disk import DiskStorage

    app = build_app(Config(), DiskStorage(tmp_path / "data"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    running = await start(Config(), app, sock, LineSink(io.StringIO()))
    await app[state.CACHES].ensure("main")
    token, _ = await app[state.TOKENS].issue("main", Scope.WRITE, 3600)
    reader, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
    writer.write(
        f"PUT /main/sccache/a/b/entry HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        "Content-Length: 1000000\r\n\r\n".encode()
        + b"x" * 1000
    )
    await writer.drain()
    await asyncio.sleep(0.2)  # the route is waiting for the rest of the body
    began = time.monotonic()
    stopping = asyncio.ensure_future(running.stop())
    status = await asyncio.wait_for(reader.readline(), 5)
    await asyncio.wait_for(stopping, 10)
    writer.close()
    assert status.split()[1] == b"503", status
    assert time.monotonic() - began < 5
    assert [key async for key in DiskStorage(tmp_path / "data").keys("caches/main/sccache")] == []
