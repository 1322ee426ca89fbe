"""Served narinfos asked for near the end of their life are looked up again in the background,
so a hot narinfo never makes a request wait for the store; a write meanwhile voids the refresh."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import pytest
import zstandard

from larder.core import keys
from larder.core.blobs import BlobStore
from larder.core.caches import CacheRegistry, CacheSettings
from larder.core.nixcache import NixCache
from larder.protocol import narinfo as narinfo_format
from larder.protocol import nix32
from larder.protocol.nar import write_nar
from tests.core.test_nar_records import Counting


class Gated(Counting):
    """The next ``held`` narinfo reads wait for ``gate`` while it is not set."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()
        self.held = 0

    async def get(self, key: str) -> bytes | None:
        if "/narinfo/" in key and self.held:
            self.held -= 1
            await self.gate.wait()
        return await super().get(key)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def remembering(storage: Counting) -> AsyncIterator[tuple[NixCache, CacheSettings, Clock]]:
    """Narinfos served from ``storage`` and remembered for 10 s of a clock the test moves."""
    clock = Clock()
    with ThreadPoolExecutor(2) as pool:
        nix = NixCache(BlobStore(storage, pool), served_ttl=10)
        nix._served._clock = clock
        cache, _ = await CacheRegistry(storage).ensure("main")
        yield nix, cache, clock


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def stored_path(nix: NixCache, cache: CacheSettings, name: str) -> str:
    nar = write_nar({"type": "regular", "contents": name.encode() * 500})
    upload = zstandard.ZstdCompressor().compress(nar)
    file_name = nix32.encode(hashlib.sha256(upload).digest()) + ".nar.zst"
    await nix.upload_nar(cache, file_name, chunks(upload))
    store_hash = nix32.encode(hashlib.sha256(name.encode()).digest()[:20])
    nar_hash = nix32.encode(hashlib.sha256(nar).digest())
    text = (
        f"StorePath: /nix/store/{store_hash}-{name}-1.0\nURL: nar/{file_name}\n"
        f"Compression: zstd\nNarHash: sha256:{nar_hash}\nNarSize: {len(nar)}\nReferences: \n"
    )
    await nix.put_narinfo(cache, store_hash, text.encode())
    return store_hash


async def test_a_hot_narinfo_is_refreshed_ahead_and_never_expires() -> None:
    storage = Counting()
    async with remembering(storage) as (nix, cache, clock):
        store_hash = await stored_path(nix, cache, "hot")
        key = keys.narinfo("main", store_hash)
        body = await nix.get_narinfo(cache, store_hash)
        assert body is not None and storage.reads.count(key) == 1
        clock.now += 5  # mid-life: no refresh
        assert nix.served_narinfo(cache, store_hash) == (True, body)
        assert not nix._refreshing
        clock.now += 3  # the last quarter: answered from memory, looked up behind it
        assert nix.served_narinfo(cache, store_hash) == (True, body)
        assert nix.served_narinfo(cache, store_hash) == (True, body)  # one refresh at a time
        assert len(nix._refreshing) == 1
        await nix.close()  # waits for the refreshes under way
        assert storage.reads.count(key) == 2
        clock.now += 5  # past the first expiry: the refreshed entry answers
        known, again = nix.served_narinfo(cache, store_hash)
        assert known and again is body  # the same stored bytes: the very same rendering


async def test_a_refresh_renders_again_only_what_changed_in_the_store(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage = Counting()
    parsed: list[bytes] = []
    real_parse = narinfo_format.parse

    def counted(data: bytes) -> narinfo_format.NarInfo:
        parsed.append(data)
        return real_parse(data)

    async with remembering(storage) as (nix, cache, clock):
        store_hash = await stored_path(nix, cache, "changing")
        monkeypatch.setattr(narinfo_format, "parse", counted)
        body = await nix.get_narinfo(cache, store_hash)
        assert body is not None and len(parsed) == 1
        clock.now += 8
        nix.served_narinfo(cache, store_hash)
        await nix.close()
        assert len(parsed) == 1  # unchanged in the store: not parsed nor signed again
        key = keys.narinfo("main", store_hash)
        stored = await storage.get(key)
        assert stored is not None
        assert b"\nReferences:" in stored
        await storage.put(key, stored + b"Deriver: 0000000000000000000000000000000a-x.drv\n")
        clock.now += 8
        nix.served_narinfo(cache, store_hash)
        await nix.close()
        known, changed = nix.served_narinfo(cache, store_hash)
        assert known and changed is not None and b"-x.drv" in changed
        assert len(parsed) == 2


async def test_a_narinfo_stored_during_a_refresh_voids_it() -> None:
    storage = Gated()
    async with remembering(storage) as (nix, cache, clock):
        store_hash = await stored_path(nix, cache, "raced")
        await nix.get_narinfo(cache, store_hash)
        clock.now += 8
        storage.gate.clear()  # the refresh's read waits
        storage.held = 1
        assert nix.served_narinfo(cache, store_hash)[0]
        assert nix._refreshing
        await asyncio.sleep(0)  # the refresh has begun
        await stored_path(nix, cache, "raced")  # stored again while the refresh is under way
        storage.gate.set()
        await nix.close()  # waits for the refreshes under way
        clock.now += 3
        assert nix.served_narinfo(cache, store_hash) == (False, None)  # it expired as it was
