"""Storage failing after a download's headers went out: the connection closes at once, so the
client sees a short body (Nix retries) instead of waiting for bytes that never come."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator

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
    assert 0 < len(body) < length
    assert b"HTTP/1.1" not in body  # no second response written into the body
