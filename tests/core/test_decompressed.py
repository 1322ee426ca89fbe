"""Serving a stored blob decoded: bounded by what is produced, whatever the stored bytes say."""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import AsyncIterator

import blake3
import pytest
import zstandard

from larder.core.blobs import decompressed
from larder.errors import StorageError, StorageUnavailable
from larder.storage.base import BlobReader

CHUNK = 256 * 1024


class Stored(BlobReader):
    """Stored bytes read in chunks; ``fail_after`` chunks, storage goes away."""

    def __init__(self, data: bytes, fail_after: int | None = None) -> None:
        self.data, self.stored_size, self.fail_after = data, len(data), fail_after
        self.closed = False

    async def chunks(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        for index, offset in enumerate(range(0, len(self.data), CHUNK)):
            if index == self.fail_after:
                raise StorageUnavailable("S3 blob read failed: connection reset")
            yield self.data[offset : offset + CHUNK]

    async def close(self) -> None:
        self.closed = True


def blob_id(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


async def collect(reader: BlobReader, size: int, content_id: str = "0" * 64) -> list[bytes]:
    return [piece async for piece in decompressed(reader, size, content_id)]


async def test_a_small_stream_of_zeros_is_decoded_a_piece_at_a_time() -> None:
    """512 MiB of zeros is a few KiB of zstd: decoding it must not hold more than a few pieces
    (a 64 KiB slice of it once decoded to the whole file in memory)."""
    size = 512 << 20
    stored = zstandard.ZstdCompressor(level=19).compress(bytes(size))
    assert len(stored) < 64 * 1024
    reader = Stored(stored)
    zeros_id = blob_id(bytes(size))
    tracemalloc.start()
    try:
        produced = largest = 0
        async for piece in decompressed(reader, size, zeros_id):
            produced += len(piece)
            largest = max(largest, len(piece))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert produced == size and largest <= 256 * 1024
    assert peak < 16 << 20, peak
    assert reader.closed


@pytest.mark.parametrize("frames", [1, 3])
async def test_every_frame_is_decoded(frames: int) -> None:
    data = os.urandom(700_000) + b"fn main() {}\n" * 100_000
    step = -(-len(data) // frames)
    compressor = zstandard.ZstdCompressor(level=3)
    stored = b"".join(compressor.compress(data[i : i + step]) for i in range(0, len(data), step))
    assert b"".join(await collect(Stored(stored), len(data), blob_id(data))) == data


@pytest.mark.parametrize(
    ("stored", "size"),
    [
        (zstandard.ZstdCompressor().compress(b"x" * 100_000)[:-10], 100_000),  # cut short
        (zstandard.ZstdCompressor().compress(b"x" * 100_000), 99_999),  # more than recorded
        (zstandard.ZstdCompressor().compress(b"x" * 100_000), 100_001),  # less than recorded
        (b"not zstd at all" * 100, 1500),
    ],
    ids=["truncated", "larger", "smaller", "not-zstd"],
)
async def test_a_blob_that_is_not_what_its_record_says_is_a_storage_error(
    stored: bytes, size: int
) -> None:
    reader = Stored(stored)
    with pytest.raises(StorageError):
        await collect(reader, size)
    assert reader.closed


async def test_a_read_failing_midway_sends_what_came_before_it() -> None:
    data = os.urandom(3 * CHUNK)
    stored = zstandard.ZstdCompressor(level=1).compress(data)
    reader = Stored(stored, fail_after=2)
    received = b""
    with pytest.raises(StorageUnavailable):
        async for piece in decompressed(reader, len(data), blob_id(data)):
            received += piece
    assert 0 < len(received) < len(data) and data.startswith(received)
    assert reader.closed


async def test_a_blob_whose_content_hashes_otherwise_never_goes_out_whole() -> None:
    """Damaged at rest, still decoding to as many bytes (zstd without a checksum keeps random
    bytes in raw blocks): every piece but the last goes out, then the error."""
    data = os.urandom(3 * CHUNK)
    stored = bytearray(zstandard.ZstdCompressor(write_checksum=False).compress(data))
    stored[len(stored) // 2] ^= 0x01
    reader = Stored(bytes(stored))
    received = b""
    with pytest.raises(StorageError, match="damaged"):
        async for piece in decompressed(reader, len(data), blob_id(data)):
            received += piece
    assert len(data) - CHUNK <= len(received) < len(data)
    assert reader.closed
