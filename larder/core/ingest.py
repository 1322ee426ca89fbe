"""Streaming verification of uploads, one chunk at a time, with bounded memory.

A NAR upload flows through one chain, driven chunk by chunk from a worker thread::

    uploaded bytes -> sha256 (FileHash) -> decompress -> NarValidator + sha256 (NarHash)
                   => blob writer (BLAKE3 + zstd into a temporary object)

The blob writer runs on a thread of its own (``=>``), fed through a queue of at most
:data:`PIPE_DEPTH` pieces, so compressing and storing overlap with decompressing and hashing
(hashlib, zstandard and blake3 release the GIL on large inputs); a writer error surfaces at the
next :meth:`NarIngest.feed` or at :meth:`NarIngest.finish`. The caller commits the blob only
after :meth:`NarIngest.finish` returned (every piece written) and the digests matched what the
upload claimed; otherwise the writer aborts and nothing becomes visible.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from dataclasses import dataclass

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


#: Pieces (of up to 256 KiB each) waiting for the blob writer's thread.
PIPE_DEPTH = 8


class _WriterThread:
    """Runs ``writer.write`` for queued pieces on a thread of its own."""

    def __init__(self, writer: BlobWriter) -> None:
        self._writer = writer
        self._queue: queue.Queue[bytes | None] = queue.Queue(PIPE_DEPTH)
        self._error: BaseException | None = None
        self._abandoned = False
        self._thread = threading.Thread(target=self._run, name="larder-blob-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (piece := self._queue.get()) is not None:
            if self._error is None and not self._abandoned:
                try:
                    self._writer.write(piece)
                except BaseException as exc:
                    self._error = exc

    def put(self, piece: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(piece)

    def drain(self) -> None:
        """Wait until every queued piece is written; raise the writer's error, if any."""
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
    """Feeds an uploaded (possibly compressed) NAR into a blob writer while verifying it."""

    def __init__(self, compression: str, writer: BlobWriter) -> None:
        self._file_hash = hashlib.sha256()
        self._file_size = 0
        self._nar_hash = hashlib.sha256()
        self._validator = NarValidator()
        self._pipe = _WriterThread(writer)
        self._decompressor = Decompressor(compression, self._take_nar)

    def _take_nar(self, data: bytes) -> None:
        self._validator.feed(data)
        self._nar_hash.update(data)
        self._pipe.put(data)

    def feed(self, data: bytes) -> None:
        """Process one chunk of the upload as it arrived on the wire."""
        self._file_hash.update(data)
        self._file_size += len(data)
        self._decompressor.write(data)

    def close(self) -> None:
        """Release the decoder (and the cycle through it) and the writer's thread; idempotent.

        After ``close`` the writer is no longer used here: the caller may commit or abort it.
        """
        self._decompressor.close()
        self._pipe.stop()

    def finish(self) -> NarDigest:
        """End of upload: raise ``FormatError`` if truncated, else return the digests once every
        byte has reached the writer."""
        self._decompressor.finish()
        self._validator.finish()
        self._pipe.drain()
        return NarDigest(
            file_sha256=self._file_hash.digest(),
            file_size=self._file_size,
            nar_sha256=self._nar_hash.digest(),
            nar_size=self._validator.size,
        )
