"""sccache entries: opaque blobs under WebDAV paths, per cache.

An entry is streamed into the shared content-addressed store and becomes visible only when the
whole body has arrived (a truncated upload aborts the blob and writes no record). The record
``caches/<cache>/sccache/<path>`` holds the blob id, size and upload time. Collections are
virtual: they are the prefixes of entry paths and always exist.

sccache's start-up probe is ``<key prefix>/.sccache_check`` (:func:`is_probe`): a GET that must
answer 200 or 404, then a PUT of ``Hello, World!`` whose failure makes the client read-only.
:func:`probe_problem` says why a prefix could hold no entry (each is ``a/b/c/<key>`` below it).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterable
from typing import NamedTuple

from larder.core import keys
from larder.core.blobs import BlobStore, load_record, record_fields
from larder.core.caches import CacheSettings
from larder.core.concurrency import bounded_map
from larder.core.lastuse import Touch, ignore_use
from larder.errors import FormatError, StorageError
from larder.protocol.dav import normalise
from larder.storage.base import BlobReader, check_blob_id

log = logging.getLogger(__name__)

# PROPFIND Depth 1 lists at most this many children (sccache never lists).
MAX_LISTING = 1000
# Entry records of a listing read at once.
_READ_CONCURRENCY = 16
PROBE_NAME = ".sccache_check"


#: What an entry's path adds below the key prefix: three one-character levels and the key (64
#: hex digits).
_ENTRY_BELOW_PREFIX = "0/0/0/" + "0" * 64


def is_probe(path: str) -> bool:
    """Whether ``path`` (a request path below the sccache root, as sent) is sccache's start-up
    probe (below any key prefix)."""
    return path.rstrip("/").rpartition("/")[2] == PROBE_NAME


def probe_problem(path: str) -> str | None:
    """Why no entry could be stored below the key prefix of the probe at ``path`` (as sent),
    or ``None``: the probe's own path may be valid where every entry's is too long."""
    prefix = path.rstrip("/").rpartition("/")[0]
    try:
        normalise(path)
        normalise(f"{prefix}/{_ENTRY_BELOW_PREFIX}")
    except FormatError as exc:
        return f"the key prefix {prefix[:80]!r} cannot hold entries: {exc}"
    return None


class Entry(NamedTuple):
    blob_id: str
    size: int
    modified: float

    def to_json(self) -> bytes:
        return json.dumps(
            {"blob": self.blob_id, "size": self.size, "modified": self.modified}
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Entry:
        """The entry stored as ``data``; :class:`StorageError` when it is not one."""
        doc = load_record(data)
        with record_fields("sccache entry"):
            return cls(check_blob_id(doc["blob"]), int(doc["size"]), float(doc["modified"]))


class SccacheStore:
    """Entries of sccache's WebDAV backend, over one store."""

    def __init__(self, blobs: BlobStore, touch: Touch = ignore_use) -> None:
        self._blobs = blobs
        self._storage = blobs.storage
        self._touch = touch

    async def put(self, cache: CacheSettings, path: str, body: AsyncIterable[bytes]) -> Entry:
        """Store the whole ``body`` as the entry at ``path`` (replacing an older one)."""
        blob = await self._blobs.store(body)
        entry = Entry(blob.blob_id, blob.size, time.time())
        await self._storage.put(keys.sccache_entry(cache.name, path), entry.to_json())
        return entry

    async def get(self, cache: CacheSettings, path: str) -> Entry | None:
        if not path:
            return None
        key = keys.sccache_entry(cache.name, path)
        data = await self._storage.get(key)
        if data is None:
            return None
        try:
            entry = Entry.from_json(data)
        except StorageError as exc:
            # Damaged at rest: missing (sccache compiles and sends it again, replacing it).
            log.error("sccache entry %s of cache %s: %s", path, cache.name, exc)
            return None
        self._touch(key)
        return entry

    async def open(self, entry: Entry) -> BlobReader | None:
        return await self._storage.blob_open(entry.blob_id)

    async def delete(self, cache: CacheSettings, path: str) -> bool:
        """Remove the entry; whether there was one. The blob stays for GC to judge."""
        key = keys.sccache_entry(cache.name, path)
        if not path or not await self._storage.exists(key):
            return False
        await self._storage.delete(key)
        return True

    async def has_children(self, cache: CacheSettings, path: str) -> bool:
        """Whether collection ``path`` holds anything (one listed item is enough)."""
        prefix = keys.sccache_prefix(cache.name, path)
        async for _ in self._storage.list_level(prefix, limit=1):
            return True
        return False

    async def children(self, cache: CacheSettings, path: str) -> list[tuple[str, Entry | None]]:
        """Direct children of collection ``path``, at most :data:`MAX_LISTING`: ``(name, entry)``,
        ``None`` for collections. One level is listed, never the keys below it."""
        prefix = keys.sccache_prefix(cache.name, path)
        listed = [item async for item in self._storage.list_level(prefix, limit=MAX_LISTING)]

        async def read(name: str) -> Entry | None:
            data = await self._storage.get(prefix + name)
            try:
                return None if data is None else Entry.from_json(data)
            except StorageError:
                return None  # damaged: listed as missing, as a GET answers it

        names = [item.name for item in listed if not item.is_level]
        entries = dict(zip(names, await bounded_map(read, names, _READ_CONCURRENCY), strict=True))
        found: list[tuple[str, Entry | None]] = []
        for item in listed:
            if item.is_level:
                found.append((item.name, None))
            elif (entry := entries[item.name]) is not None:  # else deleted since the listing
                found.append((item.name, entry))
        return found
