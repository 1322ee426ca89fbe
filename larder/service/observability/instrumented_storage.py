"""A storage backend wrapped so that every call is counted, and every failure by operation."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from larder.errors import StorageError
from larder.service.observability.metrics import Metrics
from larder.storage.base import (
    BlobInfo,
    BlobReader,
    BlobWriter,
    LevelEntry,
    ObjectInfo,
    Storage,
    StoredBlob,
)

T = TypeVar("T")


def _failed_write(metrics: Metrics) -> None:
    """A blob write that failed before its commit: one operation, one error."""
    metrics.backend_ops.labels(metrics.backend, "blob_write").inc()
    metrics.backend_errors.labels(metrics.backend, "blob_write").inc()


class _CountedWriter(BlobWriter):
    """A blob write is one operation, counted at its commit, or as failed at the first error
    (a full disk fails while the body is written, long before any commit)."""

    def __init__(self, inner: BlobWriter, metrics: Metrics) -> None:
        self._inner = inner
        self._metrics = metrics
        self._failed = False

    def _fail(self) -> None:
        if not self._failed:
            self._failed = True
            _failed_write(self._metrics)

    def write(self, data: bytes | memoryview) -> None:
        try:
            self._inner.write(data)
        except StorageError:
            self._fail()
            raise

    def write_encoded(self, piece: bytes) -> None:
        try:
            self._inner.write_encoded(piece)
        except StorageError:
            self._fail()
            raise

    @property
    def size(self) -> int:
        return self._inner.size

    def commit(
        self, expected_id: str | None = None, *, stored_sha256: bytes | None = None
    ) -> BlobInfo:
        if self._failed:
            return self._inner.commit(expected_id, stored_sha256=stored_sha256)
        self._metrics.backend_ops.labels(self._metrics.backend, "blob_write").inc()
        try:
            return self._inner.commit(expected_id, stored_sha256=stored_sha256)
        except StorageError:
            self._failed = True
            self._metrics.backend_errors.labels(self._metrics.backend, "blob_write").inc()
            raise

    def abort(self) -> None:
        self._inner.abort()


class InstrumentedStorage(Storage):
    """Delegates to ``inner``, counting operations and storage errors in ``metrics``."""

    def __init__(self, inner: Storage, metrics: Metrics) -> None:
        self.inner = inner
        self.backend = inner.backend  # type: ignore[misc]
        self._metrics = metrics

    async def _count(self, operation: str, call: Awaitable[T]) -> T:
        self._metrics.backend_ops.labels(self.backend, operation).inc()
        try:
            return await call
        except StorageError:
            self._metrics.backend_errors.labels(self.backend, operation).inc()
            raise

    async def _count_iter(self, operation: str, items: AsyncIterator[T]) -> AsyncIterator[T]:
        self._metrics.backend_ops.labels(self.backend, operation).inc()
        try:
            async for item in items:
                yield item
        except StorageError:
            self._metrics.backend_errors.labels(self.backend, operation).inc()
            raise

    def blob_writer(self, *, encoded: bool = False) -> BlobWriter:
        try:
            inner = self.inner.blob_writer(encoded=encoded)
        except StorageError:  # no room even for the temporary
            _failed_write(self._metrics)
            raise
        return _CountedWriter(inner, self._metrics)

    async def blob_open(self, blob_id: str) -> BlobReader | None:
        return await self._count("blob_open", self.inner.blob_open(blob_id))

    async def blob_stored_size(self, blob_id: str) -> int | None:
        return await self._count("blob_stored_size", self.inner.blob_stored_size(blob_id))

    async def blob_delete(self, blob_id: str) -> bool:
        return await self._count("blob_delete", self.inner.blob_delete(blob_id))

    def blob_ids(self) -> AsyncIterator[str]:
        return self._count_iter("blob_ids", self.inner.blob_ids())

    def blob_infos(self) -> AsyncIterator[StoredBlob]:
        return self._count_iter("blob_infos", self.inner.blob_infos())

    async def blob_delete_if_older(self, blob_id: str, cutoff: float) -> bool:
        return await self._count(
            "blob_delete_if_older", self.inner.blob_delete_if_older(blob_id, cutoff)
        )

    async def get(self, key: str) -> bytes | None:
        return await self._count("get", self.inner.get(key))

    async def put(self, key: str, data: bytes) -> None:
        await self._count("put", self.inner.put(key, data))

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        return await self._count("put_if_absent", self.inner.put_if_absent(key, data))

    async def exists(self, key: str) -> bool:
        return await self._count("exists", self.inner.exists(key))

    async def delete(self, key: str) -> bool:
        return await self._count("delete", self.inner.delete(key))

    def keys(self, prefix: str) -> AsyncIterator[str]:
        return self._count_iter("keys", self.inner.keys(prefix))

    def object_infos(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        return self._count_iter("object_infos", self.inner.object_infos(prefix))

    def list_level(self, prefix: str, *, limit: int) -> AsyncIterator[LevelEntry]:
        return self._count_iter("list_level", self.inner.list_level(prefix, limit=limit))

    async def delete_if_older(self, key: str, cutoff: float) -> bool:
        return await self._count("delete_if_older", self.inner.delete_if_older(key, cutoff))

    async def check(self) -> None:
        await self._count("check", self.inner.check())

    async def check_writes(self) -> None:
        await self._count("check_writes", self.inner.check_writes())

    async def room_for(self, size: int) -> bool:
        return await self._count("room_for", self.inner.room_for(size))

    async def note_full(self) -> None:
        await self._count("note_full", self.inner.note_full())

    async def full_since(self) -> float | None:
        return await self._count("full_since", self.inner.full_since())

    async def release_reserve(self) -> bool:
        return await self._count("release_reserve", self.inner.release_reserve())

    async def housekeep(self) -> None:
        await self._count("housekeep", self.inner.housekeep())

    async def close(self) -> None:
        await self.inner.close()
