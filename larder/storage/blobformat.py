"""The blob format at rest, and the streaming encoder every :class:`BlobWriter` shares.

A stored blob is a zstd stream (RFC 8878) holding the uncompressed bytes, either

* larder's own encoding (:class:`BlobEncoder`): exactly one frame, with an XXH64 content
  checksum (so any zstd decoder, Nix's included, detects a corrupted file) and no content size
  (it is not known while streaming); or
* a stream the caller received and verified, kept as it came (:class:`KeptStream`, writers made
  with ``encoded=True``): a zstd NAR upload that decoded completely, within the decoder's window
  limit, to the very bytes hashed. Nix writes one frame without a checksum; other encoders may
  write several frames, or skippable ones, which every conforming decoder reads as one stream.

Either way the blob id is the BLAKE3-256 hex digest of the *uncompressed* bytes (64 lowercase
hex digits), and a blob file is a servable ``.zst`` (``.nar.zst``) as it is. Memory stays
bounded: input is fed to one zstd stream in slices of at most :data:`WRITE_SLICE` bytes and each
compressed piece goes to the backend's sink as soon as zstd emits it.

:class:`EncodingBlobWriter` is the part of a writer that does not depend on the backend: hashing,
compression, the open/committed/aborted life cycle, and cleanup when anything fails. A backend
supplies three hooks: where compressed pieces go (``_sink``), how a finished temporary object
becomes visible under its id (``_publish``, which says how many bytes the kept blob has at rest:
when the content was stored already, the earlier encoding may be what stays) and how it is
discarded (``_discard``).
"""

from __future__ import annotations

import hashlib
from abc import abstractmethod
from collections.abc import Callable
from enum import Enum
from typing import BinaryIO, cast

import blake3
import zstandard

from larder.errors import VerificationFailed
from larder.protocol.compression import ZSTD_MAX_WINDOW
from larder.storage.base import BlobInfo, BlobWriter

DEFAULT_ZSTD_LEVEL = 3
#: Size of the pieces readers hand out and of each ranged read.
READ_CHUNK = 256 * 1024
#: Largest slice of input given to zstd at once (bounds the size of each compressed piece).
WRITE_SLICE = 1024 * 1024


def check_zstd_level(level: int) -> int:
    """Return ``level`` if zstd accepts it (negative levels are the fast modes)."""
    if not -(1 << 17) <= level <= zstandard.MAX_COMPRESSION_LEVEL:
        raise ValueError(f"zstd level must be at most {zstandard.MAX_COMPRESSION_LEVEL}: {level}")
    return level


def _closed_sink(piece: bytes) -> None:
    raise ValueError("write after the blob encoder was closed")


class _Finished:
    def compress(self, data: bytes | memoryview) -> bytes:
        raise ValueError("write after the blob encoder was closed")

    def flush(self, mode: int = 0) -> bytes:
        raise ValueError("the blob encoder is already finished")


_FINISHED = _Finished()


class BlobEncoder:
    """BLAKE3 of the input and one zstd stream of it, handed to ``sink`` piece by piece."""

    def __init__(
        self,
        sink: Callable[[bytes], None],
        *,
        level: int = DEFAULT_ZSTD_LEVEL,
        threads: int = 0,
    ) -> None:
        if threads < 0:
            raise ValueError(f"zstd threads must be >= 0: {threads}")
        compressor = zstandard.ZstdCompressor(
            level=check_zstd_level(level),
            write_checksum=True,
            write_content_size=False,
            threads=threads,
        )
        self._stream = compressor.compressobj()
        self._hasher = blake3.blake3()
        self._sink = sink
        self.size = 0
        self.stored_size = 0

    def _emit(self, piece: bytes) -> None:
        if piece:
            self._sink(piece)
            self.stored_size += len(piece)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        for offset in range(0, len(view), WRITE_SLICE):
            piece = view[offset : offset + WRITE_SLICE]
            self._hasher.update(piece)
            self._emit(self._stream.compress(piece))
            self.size += len(piece)

    def write_encoded(self, piece: bytes) -> None:
        raise ValueError("this blob writer encodes the stream itself")

    def finish(self) -> str:
        """End the zstd frame and return the blob id (BLAKE3 hex of everything written)."""
        self._emit(self._stream.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH))
        self.close()
        return self._hasher.hexdigest()

    def close(self) -> None:
        """Drop the compressor and the sink: the owner's bound ``_sink`` would otherwise keep
        a cycle (and the compressor's buffers) alive until a full garbage collection."""
        self._sink = _closed_sink
        self._stream = _FINISHED  # type: ignore[assignment]


class KeptStream:
    """BLAKE3 of the content, and a zstd stream encoded elsewhere handed to ``sink`` as it comes.

    The same shape as :class:`BlobEncoder`: :meth:`write` takes the content (hashed only),
    :meth:`write_encoded` the stored bytes.
    """

    def __init__(self, sink: Callable[[bytes], None]) -> None:
        self._hasher = blake3.blake3()
        self._sink = sink
        self.size = 0
        self.stored_size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._hasher.update(data)
        self.size += len(data)

    def write_encoded(self, piece: bytes) -> None:
        if piece:
            self._sink(piece)
            self.stored_size += len(piece)

    def finish(self) -> str:
        self.close()
        return self._hasher.hexdigest()

    def close(self) -> None:
        self._sink = _closed_sink


class _State(Enum):
    OPEN = "open"
    COMMITTED = "committed"
    ABORTED = "aborted"


class EncodingBlobWriter(BlobWriter):
    """A blob writer that encodes with :class:`BlobEncoder` into a backend's temporary object.

    Any exception from ``write`` or ``commit`` discards the temporary object before it
    propagates, so a failed writer never leaks (the caller's ``abort`` is then a no-op).
    """

    def __init__(
        self, *, level: int = DEFAULT_ZSTD_LEVEL, threads: int = 0, encoded: bool = False
    ) -> None:
        self._encoder: BlobEncoder | KeptStream
        # The bytes this writer encodes are hashed as they go; a kept stream's hash is the
        # caller's (commit's stored_sha256).
        self._stored_hash = hashlib.sha256()
        if encoded:
            self._encoder = KeptStream(self._sink)
        else:
            self._encoder = BlobEncoder(self._hashed_sink, level=level, threads=threads)
        self._encoded = encoded
        self._state = _State.OPEN

    def _hashed_sink(self, piece: bytes) -> None:
        self._stored_hash.update(piece)
        self._sink(piece)

    # -- backend hooks -------------------------------------------------------------------

    @abstractmethod
    def _sink(self, piece: bytes) -> None:
        """Append compressed bytes to the temporary object."""

    @abstractmethod
    def _publish(self, info: BlobInfo) -> tuple[int, bytes | None]:
        """Make the finished temporary object visible as ``info.blob_id``; return the stored
        size of the blob now under that id, and the sha256 of its bytes when known: this
        writer's (``info.stored_sha256``) when they are its, else what the backend recorded
        with the bytes kept, if anything.

        If that blob exists, keep it (the content is identical, its encoding may differ: the
        records made from it describe its bytes) but refresh its modification time: a garbage
        collector must see content committed again as fresh. A backend that can check the
        existing blob cheaply (:func:`check_stored`) replaces one damaged at rest instead.
        """

    @abstractmethod
    def _discard(self) -> None:
        """Remove the temporary object. Must be safe to call in any state of the temporary."""

    # -- BlobWriter ----------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._encoder.size

    def _check_open(self) -> None:
        if self._state is not _State.OPEN:
            raise ValueError(f"blob writer is {self._state.value}")

    def write(self, data: bytes | memoryview) -> None:
        self._check_open()
        try:
            self._encoder.write(data)
        except BaseException:
            self.abort()
            raise

    def write_encoded(self, piece: bytes) -> None:
        self._check_open()
        try:
            self._encoder.write_encoded(piece)
        except BaseException:
            self.abort()
            raise

    def commit(
        self, expected_id: str | None = None, *, stored_sha256: bytes | None = None
    ) -> BlobInfo:
        self._check_open()
        try:
            blob_id = self._encoder.finish()
            if expected_id is not None and blob_id != expected_id:
                raise VerificationFailed(
                    f"content hash mismatch: the body's BLAKE3 is {blob_id}, expected {expected_id}"
                )
            digest = stored_sha256 if self._encoded else self._stored_hash.digest()
            info = BlobInfo(blob_id, self._encoder.size, self._encoder.stored_size, digest)
            kept_size, kept_sha256 = self._publish(info)
            info = BlobInfo(blob_id, info.size, kept_size, kept_sha256)
        except BaseException:
            self.abort()
            raise
        self._state = _State.COMMITTED
        return info

    def abort(self) -> None:
        if self._state is not _State.OPEN:
            return
        self._state = _State.ABORTED
        self._encoder.close()
        self._discard()


class _Hashing:
    """A binary file read through, the sha256 of what was read kept on the way."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.sha256 = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self.sha256.update(data)
        return data


def check_stored(file: BinaryIO, blob_id: str, size: int) -> bytes | None:
    """The sha256 of a stored blob's bytes read from ``file`` if they decode to ``size`` bytes
    whose BLAKE3 is ``blob_id``; ``None`` if they do not (the blob is damaged). Decodes at most
    one byte past ``size``, a :data:`READ_CHUNK` at a time."""
    hashing = _Hashing(file)
    decoder = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    content = blake3.blake3()
    produced = 0
    try:
        with decoder.stream_reader(
            cast(BinaryIO, hashing), read_size=READ_CHUNK, read_across_frames=True, closefd=False
        ) as stream:
            while produced <= size:
                piece = stream.read(READ_CHUNK)
                if not piece:
                    break
                content.update(piece)
                produced += len(piece)
    except zstandard.ZstdError:
        return None
    if produced != size or content.hexdigest() != blob_id or file.read(1):
        return None
    return hashing.sha256.digest()


def clamp_range(start: int, end: int | None, size: int) -> tuple[int, int]:
    """Validate a ``chunks(start, end)`` request against a stored size; clamp to the blob."""
    if start < 0 or (end is not None and end < start):
        raise ValueError(f"invalid byte range: start={start} end={end}")
    stop = size if end is None else min(end, size)
    return min(start, stop), stop
