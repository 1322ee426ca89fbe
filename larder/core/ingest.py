"""Streaming verification of uploads, one chunk at a time, with bounded memory.

A NAR upload flows through one synchronous chain, driven chunk by chunk from a worker thread::

    uploaded bytes -> sha256 (FileHash) -> decompress -> NarValidator + sha256 (NarHash)
                   -> blob writer (BLAKE3 + zstd into a temporary object)

The caller commits the blob only after :meth:`NarIngest.finish` returned and the digests matched
what the upload claimed; otherwise the writer aborts and nothing becomes visible.
"""

from __future__ import annotations

import hashlib
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


class NarIngest:
    """Feeds an uploaded (possibly compressed) NAR into a blob writer while verifying it."""

    def __init__(self, compression: str, writer: BlobWriter) -> None:
        self._file_hash = hashlib.sha256()
        self._file_size = 0
        self._nar_hash = hashlib.sha256()
        self._validator = NarValidator()
        self._writer = writer
        self._decompressor = Decompressor(compression, self._take_nar)

    def _take_nar(self, data: bytes) -> None:
        self._validator.feed(data)
        self._nar_hash.update(data)
        self._writer.write(data)

    def feed(self, data: bytes) -> None:
        """Process one chunk of the upload as it arrived on the wire."""
        self._file_hash.update(data)
        self._file_size += len(data)
        self._decompressor.write(data)

    def close(self) -> None:
        """Release the decoder (and the cycle through it); idempotent."""
        self._decompressor.close()

    def finish(self) -> NarDigest:
        """End of upload: raise ``FormatError`` if truncated, else return the digests."""
        self._decompressor.finish()
        self._validator.finish()
        return NarDigest(
            file_sha256=self._file_hash.digest(),
            file_size=self._file_size,
            nar_sha256=self._nar_hash.digest(),
            nar_size=self._validator.size,
        )
