"""How much a cache stores, by kind: object counts and the bytes their blobs take.

A scan lists the cache's keys and reads the records that carry a size (NAR records, Nix extras,
rustc blob markers, sccache entries); narinfos and rustc manifests are counted only. It costs one
listing per kind plus one read per sized record, so the service runs it every few minutes, not
per request. Blobs shared between caches count in each.
"""

from __future__ import annotations

from larder.core import keys
from larder.core.blobs import load_record
from larder.errors import StorageError
from larder.storage.base import Storage

# kind -> (key prefix below caches/<cache>/, record field holding a size or None)
KINDS: dict[str, tuple[str, str | None]] = {
    "narinfo": ("narinfo/", None),
    "nar": ("nar/", "stored_size"),
    "nix_file": ("file/", "size"),
    "rustc_manifest": ("rustc/manifest/", None),
    "rustc_blob": ("rustc/blob/", "size"),
    "sccache_entry": ("sccache/", "size"),
}


async def usage(storage: Storage, cache: str) -> dict[str, tuple[int, int]]:
    """``kind -> (objects, bytes)`` for one cache."""
    report: dict[str, tuple[int, int]] = {}
    base = keys.cache_prefix(cache)
    for kind, (prefix, field) in KINDS.items():
        count = size = 0
        async for key in storage.keys(base + prefix):
            count += 1
            if field is None:
                continue
            data = await storage.get(key)
            if data is None:
                continue
            try:
                size += int(load_record(data).get(field, 0))
            except (StorageError, TypeError, ValueError):
                continue  # a record written by another version: counted, not sized
        report[kind] = (count, size)
    return report
