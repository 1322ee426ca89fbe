"""An in-process store in dictionaries, for tests.

It behaves like the real backends where callers can tell: blobs are really zstd-compressed and
hashed, a blob becomes visible only on commit, keys are validated, and the dictionaries are
guarded by a lock because blob writers run on worker threads. Each entry records the time of its
last write (for a blob: its last commit, repeated commits included) from ``clock``, which tests
may replace to age what is stored.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import ClassVar, NamedTuple

from larder.storage.base import (
    BlobInfo,
    BlobReader,
    BlobWriter,
    LevelEntry,
    ObjectInfo,
    Storage,
    StoredBlob,
    check_blob_id,
    check_directory,
    check_key,
    check_limit,
    check_prefix,
    level_order,
)
from larder.storage.blobformat import (
    DEFAULT_ZSTD_LEVEL,
    READ_CHUNK,
    EncodingBlobWriter,
    clamp_range,
)


class _Entry(NamedTuple):
    data: bytes
    modified: float  # time.time() of the last write


class _MemoryBlobWriter(EncodingBlobWriter):
    def __init__(self, storage: MemoryStorage, level: int, threads: int, encoded: bool) -> None:
        self._storage = storage
        self._pieces: list[bytes] = []
        super().__init__(level=level, threads=threads, encoded=encoded)

    def _sink(self, piece: bytes) -> None:
        self._pieces.append(piece)

    def _publish(self, info: BlobInfo) -> tuple[int, bytes | None]:
        data = b"".join(self._pieces)
        self._pieces = []
        blobs = self._storage._blobs
        with self._storage._lock:
            existing = blobs.get(info.blob_id)
            # identical content is kept; only the commit time moves
            kept = existing.data if existing else data
            blobs[info.blob_id] = _Entry(kept, self._storage.clock())
        return len(kept), info.stored_sha256 if existing is None else None

    def _discard(self) -> None:
        self._pieces = []


class _MemoryBlobReader(BlobReader):
    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data
        self.stored_size = len(data)

    async def chunks(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        start, stop = clamp_range(start, end, self.stored_size)
        for offset in range(start, stop, READ_CHUNK):
            if self._data is None:
                raise ValueError("blob reader is closed")
            yield self._data[offset : min(offset + READ_CHUNK, stop)]

    async def close(self) -> None:
        self._data = None


class MemoryStorage(Storage):
    """Blobs and objects in dictionaries; nothing survives the process."""

    backend: ClassVar[str] = "memory"

    def __init__(
        self,
        *,
        zstd_level: int = DEFAULT_ZSTD_LEVEL,
        zstd_threads: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock
        self._zstd_level = zstd_level
        self._zstd_threads = zstd_threads
        self._lock = threading.Lock()
        self._blobs: dict[str, _Entry] = {}
        self._objects: dict[str, _Entry] = {}

    # -- blobs ---------------------------------------------------------------------------

    def blob_writer(self, *, encoded: bool = False) -> BlobWriter:
        return _MemoryBlobWriter(self, self._zstd_level, self._zstd_threads, encoded)

    async def blob_open(self, blob_id: str) -> BlobReader | None:
        check_blob_id(blob_id)
        with self._lock:
            entry = self._blobs.get(blob_id)
        return _MemoryBlobReader(entry.data) if entry is not None else None

    async def blob_stored_size(self, blob_id: str) -> int | None:
        check_blob_id(blob_id)
        with self._lock:
            entry = self._blobs.get(blob_id)
        return len(entry.data) if entry is not None else None

    async def blob_delete(self, blob_id: str) -> bool:
        check_blob_id(blob_id)
        with self._lock:
            return self._blobs.pop(blob_id, None) is not None

    async def blob_ids(self) -> AsyncIterator[str]:
        with self._lock:
            ids = list(self._blobs)
        for blob_id in ids:
            yield blob_id

    async def blob_infos(self) -> AsyncIterator[StoredBlob]:
        with self._lock:
            infos = [StoredBlob(i, len(e.data), e.modified) for i, e in self._blobs.items()]
        for info in infos:
            yield info

    async def blob_delete_if_older(self, blob_id: str, cutoff: float) -> bool:
        check_blob_id(blob_id)
        with self._lock:
            return _pop_if_older(self._blobs, blob_id, cutoff)

    # -- objects -------------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        check_key(key)
        with self._lock:
            entry = self._objects.get(key)
        return entry.data if entry is not None else None

    async def put(self, key: str, data: bytes) -> None:
        check_key(key)
        data = bytes(data)
        with self._lock:
            self._objects[key] = _Entry(data, self.clock())

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        check_key(key)
        with self._lock:
            if key in self._objects:
                return False
            self._objects[key] = _Entry(bytes(data), self.clock())
            return True

    async def exists(self, key: str) -> bool:
        check_key(key)
        with self._lock:
            return key in self._objects

    async def delete(self, key: str) -> bool:
        check_key(key)
        with self._lock:
            return self._objects.pop(key, None) is not None

    async def keys(self, prefix: str) -> AsyncIterator[str]:
        check_prefix(prefix)
        with self._lock:
            matching = sorted(key for key in self._objects if key.startswith(prefix))
        for key in matching:
            yield key

    async def object_infos(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        check_prefix(prefix)
        with self._lock:
            infos = [
                ObjectInfo(key, len(entry.data), entry.modified)
                for key, entry in sorted(self._objects.items())
                if key.startswith(prefix)
            ]
        for info in infos:
            yield info

    async def list_level(self, prefix: str, *, limit: int) -> AsyncIterator[LevelEntry]:
        check_directory(prefix)
        check_limit(limit)
        found: dict[tuple[str, bool], LevelEntry] = {}
        with self._lock:
            for key, entry in self._objects.items():
                if not key.startswith(prefix):
                    continue
                name, below, _ = key[len(prefix) :].partition("/")
                if below:
                    found[name, True] = LevelEntry(name, None)
                else:
                    found[name, False] = LevelEntry(
                        name, ObjectInfo(key, len(entry.data), entry.modified)
                    )
        listing = sorted(found.values(), key=lambda item: level_order(prefix, item))
        for item in listing[:limit]:
            yield item

    async def delete_if_older(self, key: str, cutoff: float) -> bool:
        check_key(key)
        with self._lock:
            return _pop_if_older(self._objects, key, cutoff)

    # -- lifecycle -----------------------------------------------------------------------

    async def check(self) -> None:
        return None


def _pop_if_older(entries: dict[str, _Entry], name: str, cutoff: float) -> bool:
    """Remove ``entries[name]`` if it was written strictly before ``cutoff`` (hold the lock)."""
    entry = entries.get(name)
    if entry is None or not entry.modified < cutoff:
        return False
    del entries[name]
    return True
