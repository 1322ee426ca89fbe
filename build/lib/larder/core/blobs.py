"""Streaming request bodies into content-addressed blobs, shared by every protocol.

Hashing, compression and file writes are blocking, so they run on the given executor; the event
loop only moves chunks. A blob becomes visible only on :meth:`BlobWriter.commit`, which the
caller reaches after every check has passed; on any error the temporary is aborted and nothing
is left behind.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterable, AsyncIterator, Callable
from concurrent.futures import Executor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from larder.errors import StorageError, TooLarge
from larder.protocol.compression import Decompressor
from larder.storage.base import BlobInfo, BlobReader, BlobWriter, Storage

T = TypeVar("T")

_DECOMPRESS_SLICE = 64 * 1024


class BlobStore:
    """Runs blocking blob work off the event loop for the protocol modules."""

    def __init__(self, storage: Storage, executor: Executor) -> None:
        self.storage = storage
        self._executor = executor

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the executor."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @asynccontextmanager
    async def writer(self, *, encoded: bool = False) -> AsyncIterator[BlobWriter]:
        """A new blob writer (see ``Storage.blob_writer``), aborted on exit unless the caller
        committed it."""
        writer = await self.run(functools.partial(self.storage.blob_writer, encoded=encoded))
        try:
            yield writer
        finally:
            await self.run(writer.abort)

    async def store(
        self, body: AsyncIterable[bytes], *, coding: str = "none", limit: int | None = None
    ) -> BlobInfo:
        """Stream an opaque ``body`` into a new blob and commit it.

        ``coding`` names the :class:`Decompressor` that undoes the body's content coding: the
        blob holds the decoded bytes, at most ``limit`` of them (:class:`TooLarge` past that,
        and nothing is stored). A body that does not decode is a ``FormatError``.
        """
        async with self.writer() as writer:
            if coding == "none":
                async for chunk in body:
                    if limit is not None and writer.size + len(chunk) > limit:
                        raise TooLarge(f"body exceeds the limit of {limit} bytes")
                    await self.run(writer.write, chunk)
                return await self.run(writer.commit)
            decoder = Decompressor(coding, _Bounded(writer.write, limit))
            try:
                async for chunk in body:
                    await self.run(decoder.write, chunk)
                await self.run(decoder.finish)
            finally:
                decoder.close()
            return await self.run(writer.commit)


class _Bounded:
    """A sink that passes pieces on until ``limit`` bytes went through, then raises."""

    def __init__(self, sink: Callable[[bytes], None], limit: int | None) -> None:
        self._sink = sink
        self._limit = limit
        self.size = 0

    def __call__(self, piece: bytes) -> None:
        self.size += len(piece)
        if self._limit is not None and self.size > self._limit:
            raise TooLarge(f"decoded body exceeds the limit of {self._limit} bytes")
        self._sink(piece)


def decode_document(data: bytes, coding: str, limit: int) -> bytes:
    """A small body (a narinfo, a JSON document) decoded from its content coding, at most
    ``limit`` bytes decoded (:class:`TooLarge` past that)."""
    if coding == "none":
        return data
    pieces: list[bytes] = []
    decoder = Decompressor(coding, _Bounded(pieces.append, limit))
    try:
        decoder.write(data)
        decoder.finish()
    finally:
        decoder.close()
    return b"".join(pieces)


def load_record(data: bytes) -> dict[str, Any]:
    """A stored JSON record as a dict; :class:`StorageError` when it is corrupt."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise StorageError(f"corrupt record: {exc}") from None
    if not isinstance(doc, dict):
        raise StorageError("corrupt record: not an object")
    return doc


async def decompressed(reader: BlobReader) -> AsyncIterator[bytes]:
    """The uncompressed bytes of a stored blob, in bounded pieces; closes ``reader``."""
    pieces: list[bytes] = []
    decompressor = Decompressor("zstd", pieces.append)
    try:
        async for chunk in reader.chunks():
            for offset in range(0, len(chunk), _DECOMPRESS_SLICE):
                decompressor.write(chunk[offset : offset + _DECOMPRESS_SLICE])
                for piece in pieces:
                    yield piece
                pieces.clear()
        decompressor.finish()
        for piece in pieces:
            yield piece
    finally:
        decompressor.close()
        await reader.close()
