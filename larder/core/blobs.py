"""Streaming request bodies into content-addressed blobs, shared by every protocol.

Hashing, compression and file writes are blocking, so they run on the given executor; the event
loop only moves chunks. A blob becomes visible only on :meth:`BlobWriter.commit`, which the
caller reaches after every check has passed; on any error the temporary is aborted and nothing
is left behind.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from contextlib import asynccontextmanager, contextmanager
from typing import Any, BinaryIO, TypeVar, cast

import blake3
import zstandard

from larder.core.decoding import DecoderBudget, Pausing, Reservation, first_allowance, settle
from larder.errors import StorageError, StorageUnavailable, TooLarge
from larder.protocol.compression import ZSTD_MAX_WINDOW, Decompressor
from larder.storage.base import BlobInfo, BlobReader, BlobWriter, Storage

T = TypeVar("T")


class BlobStore:
    """Runs blocking blob work off the event loop for the protocol modules.

    ``decoders``: the process's budget of upload decoder memory (:mod:`larder.core.decoding`);
    without one, uploads' decoders are not accounted.
    """

    def __init__(
        self, storage: Storage, executor: Executor, decoders: DecoderBudget | None = None
    ) -> None:
        self.storage = storage
        self._executor = executor
        self.decoders = decoders

    @asynccontextmanager
    async def decoder_memory(self) -> AsyncIterator[Reservation | None]:
        """The reservation of one upload's decoder memory (``None`` without a budget), released
        when the block ends."""
        if self.decoders is None:
            yield None
            return
        async with self.decoders.reservation() as reservation:
            yield reservation

    async def decode(
        self, step: Callable[[bytes], None], target: Pausing, chunk: bytes,
        reservation: Reservation | None,
    ) -> None:  # fmt: skip
        """``step(chunk)`` on the executor (feeding ``target``), then, while ``target`` waits
        for decoder memory, reserve it and resume."""
        await self.run(step, chunk)
        if reservation is not None:
            await settle(target, reservation, self.run)

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
            async with self.decoder_memory() as memory:
                allowance = first_allowance(memory)
                decoder = Decompressor(coding, _Bounded(writer.write, limit), allowance=allowance)
                try:
                    async for chunk in body:
                        await self.decode(decoder.write, decoder, chunk, memory)
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


@contextmanager
def record_fields(what: str) -> Iterator[None]:
    """Reading a stored record's fields: one missing or of another type (damaged at rest) is a
    :class:`StorageError` naming ``what``."""
    try:
        yield
    except (KeyError, TypeError, ValueError) as exc:
        raise StorageError(f"corrupt {what}: {exc!r}") from None


class Decoded:
    """The pieces :func:`decompressed` yields; :meth:`aclose` closes the reader also when no
    piece was asked for yet (an async generator never started runs no ``finally``)."""

    def __init__(self, reader: BlobReader, size: int | None, blob_id: str) -> None:
        self._reader = reader
        self._pieces = _decode(reader, size, blob_id)

    def __aiter__(self) -> Decoded:
        return self

    async def __anext__(self) -> bytes:
        return await anext(self._pieces)

    async def aclose(self) -> None:
        await self._pieces.aclose()
        await self._reader.close()


def decompressed(reader: BlobReader, size: int | None, blob_id: str) -> Decoded:
    """The ``size`` uncompressed bytes of blob ``blob_id`` (``None``: as many as it holds), in
    pieces (:func:`_decode`); closes ``reader`` when they end or are closed."""
    return Decoded(reader, size, blob_id)


async def is_sound(reader: BlobReader, size: int, blob_id: str) -> bool:
    """Whether a stored blob decodes to its ``size`` bytes hashing to ``blob_id`` (read whole,
    nothing kept); closes ``reader``. Storage failing meanwhile raises."""
    try:
        async for _ in decompressed(reader, size, blob_id):
            pass
    except StorageUnavailable:
        raise
    except StorageError:
        return False
    return True


async def _decode(
    reader: BlobReader, size: int | None, blob_id: str
) -> AsyncGenerator[bytes, None]:
    """The ``size`` uncompressed bytes of blob ``blob_id`` (``None``: however many it holds),
    in pieces of at most :data:`_PIECE`; closes ``reader``.

    Bounded by what is *produced*, not read: a few KiB of zstd can decode to gigabytes (a NAR
    of zeros), so each step decodes one piece from stored bytes fetched ahead (enough for any
    piece of real data). A stream that decodes to other than ``size`` bytes, or not at all, or
    to bytes whose BLAKE3 is not ``blob_id``, is a :class:`StorageError` (the store holds
    something other than what its record says): the last piece is held back until the hash is
    known, so a damaged blob never reaches a client whole. A read that fails mid-way still
    yields what came before it, but for that held piece.
    """
    feed = _Feed()
    chunks = reader.chunks().__aiter__()
    ended = False
    failure: BaseException | None = None
    decoder = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    stream = decoder.stream_reader(
        cast(BinaryIO, feed), read_size=_FEED_READ, read_across_frames=True, closefd=False
    )
    produced = 0
    hasher = blake3.blake3()
    held = b""
    try:
        while True:
            while not ended and feed.size < _AHEAD:
                try:
                    feed.add(await anext(chunks))
                except StopAsyncIteration:
                    ended = True
                except Exception as exc:  # storage gone: send what came, then fail
                    ended, failure = True, exc
            try:
                piece = stream.read(_PIECE if size is None else min(_PIECE, size + 1 - produced))
            except zstandard.ZstdError as exc:
                raise failure or StorageError(f"stored blob does not decode: {exc}") from None
            if not piece:
                break
            produced += len(piece)
            if size is not None and produced > size:
                raise StorageError(f"stored blob decodes to more than its {size} bytes")
            hasher.update(piece)
            if held:
                yield held
            held = piece
        if failure is not None:
            raise failure
        if not ended or feed.size:
            raise StorageError("stored blob has bytes past the end of its zstd stream")
        if size is not None and produced != size:
            raise StorageError(f"stored blob decodes to {produced} bytes, not {size}")
        if hasher.hexdigest() != blob_id:
            raise StorageError(f"stored blob {blob_id} is damaged: its content hashes otherwise")
        if held:
            yield held
    finally:
        stream.close()  # type: ignore[no-untyped-call]
        await reader.close()


#: Decoded bytes per step of :func:`decompressed`.
_PIECE = 256 * 1024
#: What the zstd reader asks of the stored bytes at a time.
_FEED_READ = 64 * 1024
#: Stored bytes held ahead of each step: a piece of data needs at most about as many stored
#: bytes (a zstd block never stores more than it holds) plus a block and a read.
_AHEAD = _PIECE + 128 * 1024 + _FEED_READ + 64 * 1024


class _Feed:
    """Stored bytes fetched ahead, as a file the zstd reader reads; empty only at the end."""

    def __init__(self) -> None:
        self._pieces: collections.deque[memoryview] = collections.deque()
        self.size = 0

    def add(self, data: bytes) -> None:
        if data:
            self._pieces.append(memoryview(data))
            self.size += len(data)

    def read(self, wanted: int = -1) -> bytes:
        if not self._pieces:
            return b""
        first = self._pieces[0]
        if wanted < 0 or wanted >= len(first):
            self._pieces.popleft()
        else:
            self._pieces[0], first = first[wanted:], first[:wanted]
        self.size -= len(first)
        return bytes(first)
