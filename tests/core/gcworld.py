"""A small store with a controllable clock, and helpers to push closures and check them."""

from __future__ import annotations

import hashlib
import lzma
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from larder.core import keys
from larder.core.blobs import BlobStore
from larder.core.caches import CacheRegistry, CacheSettings
from larder.core.gc.collector import Collector
from larder.core.lastuse import UseRecorder
from larder.core.nixcache import NixCache
from larder.core.rustc import RustcCache
from larder.core.sccache import SccacheStore
from larder.protocol import narinfo, nix32
from larder.protocol.nar import write_nar
from larder.storage.base import ObjectInfo, Storage, StoredBlob
from larder.storage.memory import MemoryStorage

START = 1_000_000.0
GRACE = 600.0


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


Hook = Callable[[str], Awaitable[None]]


class HookedStorage(MemoryStorage):
    """Memory storage that runs a hook before chosen calls, to interleave work with a run."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock=clock)
        self.before_delete: Hook | None = None
        self.before_blob_delete: Hook | None = None
        self.after_blob_listing: Callable[[], Awaitable[None]] | None = None
        self.deletes = 0

    async def delete_if_older(self, key: str, cutoff: float) -> bool:
        if self.before_delete is not None:
            await self.before_delete(key)
        self.deletes += 1
        return await super().delete_if_older(key, cutoff)

    async def blob_delete_if_older(self, blob_id: str, cutoff: float) -> bool:
        if self.before_blob_delete is not None:
            await self.before_blob_delete(blob_id)
        return await super().blob_delete_if_older(blob_id, cutoff)

    async def blob_infos(self) -> AsyncIterator[StoredBlob]:
        async for blob in super().blob_infos():
            yield blob
        if self.after_blob_listing is not None:
            await self.after_blob_listing()

    async def state(self) -> tuple[list[ObjectInfo], list[StoredBlob]]:
        """Everything stored, for before/after comparisons."""
        objects = [info async for info in self.object_infos("")]
        blobs = sorted([blob async for blob in super().blob_infos()], key=lambda b: b.blob_id)
        return objects, blobs


async def body(data: bytes) -> AsyncIterator[bytes]:
    yield data


def store_path(name: str) -> str:
    digest = hashlib.sha256(name.encode()).digest()[:20]
    return f"/nix/store/{nix32.encode(digest)}-{name}"


def hash_part(path: str) -> str:
    return path.rsplit("/", 1)[1][:32]


def payload(name: str, size: int) -> bytes:
    return random.Random(name).randbytes(size)  # incompressible: stored size ~ size


@dataclass
class World:
    clock: Callable[[], float]
    storage: Storage
    nix: NixCache
    rustc: RustcCache
    sccache: SccacheStore
    recorder: UseRecorder
    collector: Collector
    registry: CacheRegistry
    main: CacheSettings
    executor: ThreadPoolExecutor
    pushed: dict[str, list[str]] = field(default_factory=dict)

    async def push(
        self,
        name: str,
        size: int = 2000,
        refs: list[str] | None = None,
        cache: str = "main",
        xz: bool = False,
    ) -> str:
        """Upload one store path (its NAR, uncompressed or in xz, then its narinfo) as Nix
        would."""
        settings = await self.registry.get(cache)
        assert settings is not None
        path = store_path(name)
        nar = write_nar({"type": "regular", "contents": payload(name, size)})
        sent = lzma.compress(nar) if xz else nar
        file_name = nix32.encode(hashlib.sha256(sent).digest()) + (".nar.xz" if xz else ".nar")
        await self.nix.upload_nar(settings, file_name, body(sent))
        references = " ".join(r.rsplit("/", 1)[1] for r in [*(refs or []), path])
        text = (
            f"StorePath: {path}\nURL: nar/x.nar\nCompression: none\n"
            f"NarHash: sha256:{nix32.encode(hashlib.sha256(nar).digest())}\n"
            f"NarSize: {len(nar)}\nReferences: {references}\n"
        )
        await self.nix.put_narinfo(settings, hash_part(path), text.encode())
        return path

    async def push_closure(self, label: str, count: int = 3, size: int = 2000) -> list[str]:
        """A chain of paths, each referring to every earlier one; the last is the top."""
        paths: list[str] = []
        for index in range(count):
            paths.append(await self.push(f"{label}-{index}", size, list(paths)))
        self.pushed[label] = paths
        return paths

    async def narinfo(self, path: str, cache: str = "main") -> narinfo.NarInfo | None:
        settings = await self.registry.get(cache)
        assert settings is not None
        data = await self.storage.get(keys.narinfo(cache, hash_part(path)))
        return narinfo.parse(data) if data is not None else None

    async def whole(self, path: str, cache: str = "main") -> bool:
        """The narinfo, its NAR record and blob, and the same for every reference."""
        seen: set[str] = set()
        todo = [path]
        settings = await self.registry.get(cache)
        assert settings is not None
        while todo:
            current = todo.pop()
            if current in seen:
                continue
            seen.add(current)
            info = await self.narinfo(current, cache)
            if info is None:
                return False
            record = await self.nix.nar_record(settings, info.nar_hash.nix32())
            if record is None or await self.storage.blob_stored_size(record.blob_id) is None:
                return False
            todo += [ref.full for ref in info.references]
        return True

    async def gone(self, path: str, cache: str = "main") -> bool:
        return await self.narinfo(path, cache) is None

    async def use(self, path: str, cache: str = "main") -> None:
        """A client reads the narinfo (the service records the use)."""
        settings = await self.registry.get(cache)
        assert settings is not None
        assert await self.nix.get_narinfo(settings, hash_part(path)) is not None

    async def blob_count(self) -> int:
        return len([b async for b in self.storage.blob_ids()])


@dataclass
class ClockedWorld(World):
    """A world on :class:`HookedStorage` whose clock the test moves."""

    clock: Clock
    storage: HookedStorage


async def make_world() -> ClockedWorld:
    clock = Clock()
    storage = HookedStorage(clock)
    return await world_on(storage, clock, ClockedWorld)


async def world_on(
    storage: Storage, clock: Callable[[], float] = time.time, kind: type[World] = World
) -> Any:
    """A world over any store (``kind`` picks the dataclass)."""
    executor = ThreadPoolExecutor(2)
    blobs = BlobStore(storage, executor)
    recorder = UseRecorder(storage, clock=clock)
    nix = NixCache(blobs, touch=recorder.touch)
    registry = CacheRegistry(storage, refresh_interval=0)
    main, _ = await registry.ensure("main")
    return kind(
        clock=clock,
        storage=storage,
        nix=nix,
        rustc=RustcCache(blobs, touch=recorder.touch),
        sccache=SccacheStore(blobs, touch=recorder.touch),
        recorder=recorder,
        collector=Collector(storage, recorder=recorder, forget=nix.forget, clock=clock, settle=0),
        registry=registry,
        main=main,
        executor=executor,
    )
