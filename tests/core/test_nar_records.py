"""NAR records remembered while serving: reused for downloads, dropped on upload and deletion."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import zstandard

from larder.core import keys
from larder.core.blobs import BlobStore
from larder.core.caches import CacheRegistry
from larder.core.nixcache import NixCache
from larder.protocol import nix32
from larder.protocol.nar import write_nar
from larder.storage.memory import MemoryStorage


class Counting(MemoryStorage):
    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    async def get(self, key: str) -> bytes | None:
        self.reads.append(key)
        return await super().get(key)


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_records_are_remembered_for_serving_only_and_forgotten_on_deletion() -> None:
    storage = Counting()
    with ThreadPoolExecutor(2) as pool:
        nix = NixCache(BlobStore(storage, pool), served_ttl=60)
        cache, _ = await CacheRegistry(storage).ensure("main")
        nar = write_nar({"type": "regular", "contents": b"remembered" * 1000})
        upload = zstandard.ZstdCompressor().compress(nar)
        name = nix32.encode(hashlib.sha256(upload).digest()) + ".nar.zst"
        await nix.upload_nar(cache, name, chunks(upload))
        nar_hash = nix32.encode(hashlib.sha256(nar).digest())
        key = keys.nar("main", nar_hash)
        storage.reads.clear()
        first = await nix.nar_record(cache, nar_hash, serving=True)
        second = await nix.nar_record(cache, nar_hash, serving=True)
        assert first == second and first is not None
        assert storage.reads == [key]  # the second came from memory
        await nix.nar_record(cache, nar_hash)  # not serving: always read
        assert storage.reads == [key, key]
        await storage.delete(key)
        nix.forget(key)  # what a collection tells the service
        assert await nix.nar_record(cache, nar_hash, serving=True) is None
