"""A narinfo is written only after the NAR it names (blob and record) has been made durable."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
import zstandard

from larder.core import keys
from larder.core.blobs import BlobStore
from larder.core.caches import CacheRegistry
from larder.core.nixcache import NixCache
from larder.errors import StorageError
from larder.protocol import nix32
from larder.protocol.nar import write_nar
from larder.storage.memory import MemoryStorage

STORE_HASH = "0" * 31 + "1"


class Journal(MemoryStorage):
    """Memory storage noting writes and flushes in the order they finish."""

    def __init__(self, fail_persist: bool = False) -> None:
        super().__init__()
        self.events: list[tuple[str, ...]] = []
        self.fail_persist = fail_persist

    async def put(self, key: str, data: bytes) -> None:
        await super().put(key, data)
        self.events.append(("put", key))

    async def put_pending(self, key: str, data: bytes) -> None:
        await super().put(key, data)
        self.events.append(("put_pending", key))

    async def persist(self, keys: Sequence[str] = (), blob_ids: Sequence[str] = ()) -> None:
        await asyncio.sleep(0.01)  # a slow flush: nothing may overtake it
        if self.fail_persist:
            raise StorageError("flush failed")
        self.events.append(("persist", *keys, *blob_ids))


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def upload(storage: Journal, pool: ThreadPoolExecutor) -> tuple[NixCache, object, bytes]:
    nix = NixCache(BlobStore(storage, pool))
    cache, _ = await CacheRegistry(storage).ensure("main")
    nar = write_nar({"type": "regular", "contents": b"durable" * 1000})
    body = zstandard.ZstdCompressor().compress(nar)
    name = nix32.encode(hashlib.sha256(body).digest()) + ".nar.zst"
    record = await nix.upload_nar(cache, name, chunks(body))
    narinfo = (
        f"StorePath: /nix/store/{STORE_HASH}-durable\nURL: nar/x.nar.zst\nCompression: zstd\n"
        f"NarHash: sha256:{nix32.encode(hashlib.sha256(nar).digest())}\n"
        f"NarSize: {len(nar)}\nReferences: \n"
    ).encode()
    storage.events.append(("blob", record.blob_id))
    return nix, cache, narinfo


async def test_nar_names_are_flushed_before_the_narinfo_is_written() -> None:
    storage = Journal()
    with ThreadPoolExecutor(2) as pool:
        nix, cache, narinfo = await upload(storage, pool)
        await nix.put_narinfo(cache, STORE_HASH, narinfo)  # type: ignore[arg-type]
    blob_id = next(e[1] for e in storage.events if e[0] == "blob")
    nar_key = next(e[1] for e in storage.events if e[0] == "put_pending" and "/nar/" in e[1])
    upload_events = storage.events[: storage.events.index(("blob", blob_id))]
    # The upload itself leaves the names to the narinfo: no durable put of a NAR record.
    assert not [e for e in upload_events if e[0] == "put" and "/nar" in e[1]]
    after = storage.events[storage.events.index(("blob", blob_id)) + 1 :]
    assert after == [("persist", nar_key, blob_id), ("put", keys.narinfo("main", STORE_HASH))]


async def test_a_failed_flush_leaves_no_narinfo() -> None:
    storage = Journal(fail_persist=True)
    with ThreadPoolExecutor(2) as pool:
        nix, cache, narinfo = await upload(storage, pool)
        with pytest.raises(StorageError):
            await nix.put_narinfo(cache, STORE_HASH, narinfo)  # type: ignore[arg-type]
        assert not await nix.has_narinfo(cache, STORE_HASH)  # type: ignore[arg-type]
