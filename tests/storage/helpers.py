"""Helpers shared by the storage tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import blake3
import zstandard

from larder.storage.base import BlobInfo, Storage
from larder.storage.s3 import S3Storage

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

S3_PREFIX = "pfx/"


def blob_id_of(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def write_blob_sync(storage: Storage, data: bytes, piece: int = 64 * 1024) -> BlobInfo:
    with storage.blob_writer() as writer:
        for offset in range(0, len(data), piece):
            writer.write(data[offset : offset + piece])
        return writer.commit()


async def write_blob(storage: Storage, data: bytes, piece: int = 64 * 1024) -> BlobInfo:
    return await asyncio.to_thread(write_blob_sync, storage, data, piece)


async def read_stored(
    storage: Storage, blob_id: str, start: int = 0, end: int | None = None
) -> bytes:
    reader = await storage.blob_open(blob_id)
    assert reader is not None, f"blob {blob_id} not found"
    try:
        return b"".join([chunk async for chunk in reader.chunks(start, end)])
    finally:
        await reader.close()


def decompress(stored: bytes) -> bytes:
    with zstandard.ZstdDecompressor().stream_reader(stored) as reader:
        return reader.read()


def mixed_data(size: int, seed: int = 0) -> bytes:
    """Deterministic, partly compressible bytes (random runs and repeated text)."""
    out = bytearray()
    block = 0
    while len(out) < size:
        out += blake3.blake3(f"{seed}:{block}".encode()).digest(length=4096)
        out += b"larder blob %d " % block * 64
        block += 1
    return bytes(out[:size])


@dataclass
class S3Bucket:
    endpoint: str
    name: str
    client: S3Client  # a plain client, to look behind the backend's back

    def make_storage(self, prefix: str = S3_PREFIX, **options: Any) -> S3Storage:
        options.setdefault("max_attempts", 2)
        return S3Storage(self.name, prefix, endpoint_url=self.endpoint, **options)

    def keys(self, prefix: str = "") -> list[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        return [
            item["Key"]
            for page in paginator.paginate(Bucket=self.name, Prefix=prefix)
            for item in page.get("Contents", [])
        ]

    def uploads(self) -> list[str]:
        response = self.client.list_multipart_uploads(Bucket=self.name)
        return [upload["Key"] for upload in response.get("Uploads", [])]


@dataclass
class Backend:
    name: str
    storage: Storage
    leftovers: Callable[[], Awaitable[list[str]]]  # temporaries a finished writer must not leave
