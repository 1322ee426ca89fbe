"""Streaming verification of uploads, one chunk at a time, with bounded memory.

A NAR upload flows through two threads::

    caller's thread:  uploaded bytes -> sha256 (FileHash) -> decompress -> NAR pieces
                          |                                                 |
                          | (zstd: the bytes as they came; their sha256 is  |
                          |  the FileHash, given to the writer at commit)   |
                          v                                                 v
    checker thread:   blob writer                  NarValidator + sha256 (NarHash) + blob writer
                                                   (BLAKE3; zstd re-encoding unless the upload
                                                   is kept)

The checker runs on a thread of its own, fed through a queue of at most :data:`PIPE_DEPTH`
pieces, so checking and storing overlap with hashing and decompressing the upload (hashlib,
zstandard and blake3 release the GIL on large inputs); its error (a malformed NAR, a full disk)
surfaces at the next :meth:`NarIngest.feed` or at :meth:`NarIngest.finish`.

An uncompressed upload is its NAR: its sha256 is the NarHash, and the caller's thread, which
has nothing to decode, validates it and leaves the checker thread the blob writer alone.

A zstd upload is stored as it came (:func:`keeps_upload`): it is decoded completely here, within
the decoder's window limit, so what is kept is a stream known to decode to the checked NAR, and
re-encoding it would only spend the time zstd takes to compress. Other compressions are decoded
and stored in larder's own zstd encoding.

The caller commits the blob only after :meth:`NarIngest.finish` returned (every piece checked and
written) and the digests matched what the upload claimed; otherwise the writer aborts and nothing
becomes visible.
"""

from __future__ import annotations

import asyncio
import hashlib
import queue
import threading
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import zstandard

from larder.errors import TooLarge
from larder.protocol.compression import Decompressor
from larder.protocol.nar import NarValidator
from larder.storage.base import BlobWriter


@dataclass(frozen=True)
class NarDigest:
    """What an upload turned out to contain."""

    file_sha256: bytes
    file_size: int
    nar_sha256: bytes
    nar_size: int


#: Pieces (of up to 256 KiB of NAR, or one received chunk) waiting for the checker thread.
PIPE_DEPTH = 8


#: The largest zstd window a NAR upload is kept with. What is stored is also served decoded
#: (``.nar`` to clients without zstd), and each such download holds a decoder of the stream's
#: window: one compressed with a larger window (``--ultra``, ``--long``: up to 128 MiB) is
#: stored in the store's own encoding instead.
MAX_KEPT_WINDOW = 8 << 20


def keeps_upload(compression: str, head: bytes | None = None) -> bool:
    """Whether an upload in ``compression`` is stored as it came (a writer with ``encoded``);
    given ``head``, the upload's first bytes, only when its first frame's window is at most
    :data:`MAX_KEPT_WINDOW` (a head too short to tell is not kept).

    A kept upload is decoded with that limit on every frame: a later frame with a larger window
    fails the upload (:func:`_decompressor`), since what was kept so far cannot be taken back.
    """
    if compression != "zstd":
        return False
    if head is None:
        return True
    try:
        return zstandard.get_frame_parameters(head).window_size <= MAX_KEPT_WINDOW
    except zstandard.ZstdError:
        return False


async def peek(body: AsyncIterable[bytes]) -> tuple[bytes, AsyncIterator[bytes]]:
    """The first chunk of ``body`` (``b""`` when it is empty) and the whole body again."""
    chunks = aiter(body)
    first = await anext(chunks, b"")

    async def whole() -> AsyncIterator[bytes]:
        if first:
            yield first
        async for chunk in chunks:
            yield chunk

    return first, whole()


async def pipelined(chunks: AsyncIterable[bytes], feed: Callable[[bytes], Awaitable[None]]) -> None:
    """``await feed(chunk)`` for each chunk of ``chunks``, reading the next chunk while the
    previous one is fed. A feed that fails stops the reading at once and its error is raised
    (a decoder refused, or that waited in vain for memory, must not wait for a client that has
    stopped sending); else an error of ``chunks`` is raised once the feed under way ended."""
    iterator = aiter(chunks)
    feeding: asyncio.Future[None] | None = None
    try:
        while True:
            reading = asyncio.ensure_future(anext(iterator, None))
            try:
                if feeding is not None:
                    either: list[asyncio.Future[Any]] = [reading, feeding]
                    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                    if feeding.done() and not reading.done():
                        feeding.result()  # raises if the feed failed
                chunk = await reading
            except BaseException:
                if not reading.done():
                    reading.cancel()
                    await asyncio.wait([reading])
                if not reading.cancelled():
                    reading.exception()  # retrieved: the feed's error is the one raised
                raise
            if feeding is not None:
                await feeding
            if chunk is None:
                return
            feeding = asyncio.ensure_future(feed(chunk))
    finally:
        if feeding is not None and not feeding.done():
            # The body failed while a chunk was being fed: let the feed end first.
            await asyncio.wait([feeding])
        if feeding is not None and not feeding.cancelled():
            feeding.exception()  # retrieved: when the body failed, its error is the one raised


def _decompressor(
    compression: str, sink: Callable[[bytes], None], keep: bool, allowance: int | None
) -> Decompressor:
    """The upload's decoder; a kept zstd upload's frames must all stay within the kept window.
    With an ``allowance`` it pauses for memory (:mod:`larder.core.decoding`)."""
    return Decompressor(
        compression, sink, max_window=MAX_KEPT_WINDOW if keep else None, allowance=allowance
    )


#: A queued piece: its bytes and whether they are the upload as received (else NAR bytes).
_Piece = tuple[bytes, bool]


class _Stage:
    """Runs ``handle`` on queued pieces on a thread of its own; keeps the first error."""

    def __init__(self, handle: Callable[[bytes, bool], None]) -> None:
        self._handle = handle
        self._queue: queue.Queue[_Piece | None] = queue.Queue(PIPE_DEPTH)
        self._error: BaseException | None = None
        self._abandoned = False
        self._thread = threading.Thread(target=self._run, name="larder-nar-check", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (piece := self._queue.get()) is not None:
            if self._error is None and not self._abandoned:
                try:
                    self._handle(*piece)
                except BaseException as exc:
                    self._error = exc

    def put(self, data: bytes, received: bool) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((data, received))

    def drain(self) -> None:
        """Wait until every queued piece is handled; raise the first error, if any."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Drop what is queued and end the thread (idempotent)."""
        self._abandoned = True
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


class NarIngest:
    """Feeds an uploaded (possibly compressed) NAR into a blob writer while verifying it.

    ``writer`` must have been made with ``encoded=keep`` (by default
    ``keeps_upload(compression)``). A NAR larger
    than ``max_nar_size`` bytes raises :class:`~larder.errors.TooLarge` as soon as its decoded
    bytes pass that (a small upload that decompresses to a huge NAR is stopped early).

    ``allowance`` (bytes of decoder memory; ``None``: unaccounted): after :meth:`feed`,
    ``wants`` says how much memory the decoder waits for before it goes on (0: it does not
    wait); :meth:`resume` with that much decodes the rest of the chunk.
    """

    def __init__(
        self,
        compression: str,
        writer: BlobWriter,
        max_nar_size: int | None = None,
        keep: bool | None = None,
        allowance: int | None = None,
    ) -> None:
        self._max_nar_size = max_nar_size
        self._nar_seen = 0
        self._file_hash = hashlib.sha256()
        self._file_size = 0
        self._nar_hash = hashlib.sha256()
        self._validator = NarValidator()
        self._writer = writer
        self._keep = keeps_upload(compression) if keep is None else keep
        self._plain = compression == "none"  # the upload is the NAR: checked on this thread
        self._stage = _Stage(self._check)
        self._decompressor = _decompressor(compression, self._take_nar, self._keep, allowance)

    @property
    def wants(self) -> int:
        """The decoder memory the decoder waits for (0: it does not wait)."""
        return self._decompressor.wants

    def resume(self, allowance: int) -> None:
        """Go on decoding the last chunk fed, with ``allowance`` bytes of decoder memory."""
        self._decompressor.resume(allowance)

    def _check(self, data: bytes, received: bool) -> None:
        """On the checker thread: one chunk of the upload as received, or one piece of NAR."""
        if received:  # queued only when the upload is kept
            self._writer.write_encoded(data)
            return
        if not self._plain:
            self._validator.feed(data)
            self._nar_hash.update(data)
        self._writer.write(data)

    def _take_nar(self, data: bytes) -> None:
        self._nar_seen += len(data)
        if self._max_nar_size is not None and self._nar_seen > self._max_nar_size:
            raise TooLarge(f"the NAR exceeds max_nar_size ({self._max_nar_size} bytes)")
        if self._plain:
            self._validator.feed(data)
        self._stage.put(data, False)

    def feed(self, data: bytes) -> None:
        """Process one chunk of the upload as it arrived on the wire."""
        self._file_hash.update(data)
        self._file_size += len(data)
        if self._keep:
            self._stage.put(data, True)
        self._decompressor.write(data)

    def close(self) -> None:
        """Release the decoder (and the cycle through it) and the checker thread; idempotent.

        After ``close`` the writer is no longer used here: the caller may commit or abort it.
        """
        self._decompressor.close()
        self._stage.stop()

    def finish(self) -> NarDigest:
        """End of upload: raise ``FormatError`` if truncated or malformed, else return the
        digests once every byte has been checked and has reached the writer."""
        self._decompressor.finish()
        self._stage.drain()
        self._validator.finish()
        file_sha256 = self._file_hash.digest()
        return NarDigest(
            file_sha256=file_sha256,
            file_size=self._file_size,
            nar_sha256=file_sha256 if self._plain else self._nar_hash.digest(),
            nar_size=self._validator.size,
        )


class CodedBlobIngest:
    """Feeds an upload in an HTTP content coding into a blob writer, decoding it as it comes.

    ``writer`` must have been made with ``encoded=keep`` (by default ``keeps_upload(coding)``): a
    kept zstd upload is stored as it came once it decoded completely (the writer hashes the
    decoded bytes, which is what the blob id is checked against); other uploads are decoded and
    encoded again; ``none`` passes through. Decoded bytes beyond ``max_size`` raise
    :class:`~larder.errors.TooLarge` as soon as they pass it (a small upload that expands
    enormously is stopped early); a truncated or corrupt stream raises
    :class:`~larder.errors.FormatError` at :meth:`feed` or :meth:`finish`. Synchronous: call
    from a worker thread.
    """

    def __init__(
        self,
        coding: str,
        writer: BlobWriter,
        max_size: int,
        keep: bool | None = None,
        allowance: int | None = None,
    ) -> None:
        self._writer = writer
        self._keep = keeps_upload(coding) if keep is None else keep
        self._max_size = max_size
        self._seen = 0
        self._decompressor = (
            _decompressor(coding, self._take, self._keep, allowance) if coding != "none" else None
        )

    @property
    def wants(self) -> int:
        """As :attr:`NarIngest.wants`."""
        return self._decompressor.wants if self._decompressor is not None else 0

    def resume(self, allowance: int) -> None:
        if self._decompressor is not None:
            self._decompressor.resume(allowance)

    def _take(self, data: bytes) -> None:
        self._seen += len(data)
        if self._seen > self._max_size:
            raise TooLarge(f"the decoded upload exceeds the limit of {self._max_size} bytes")
        self._writer.write(data)

    def feed(self, data: bytes) -> None:
        """Process one chunk of the upload as it arrived on the wire."""
        if self._decompressor is None:
            self._take(data)
            return
        if self._keep:
            self._writer.write_encoded(data)
        self._decompressor.write(data)

    def finish(self) -> None:
        """End of upload: raise ``FormatError`` if the stream is truncated or empty."""
        if self._decompressor is not None:
            self._decompressor.finish()

    def close(self) -> None:
        """Release the decoder (idempotent)."""
        if self._decompressor is not None:
            self._decompressor.close()
