"""NAR records remembered while serving: reused for downloads, dropped on upload and deletion."""

from __future__ import annotations

import dataclasses
import hashlib
import lzma
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import zstandard

from larder.core import keys
from larder.core.blobs import BlobStore
from larder.core.caches import CacheRegistry
from larder.core.nixcache import NarRecord, NixCache
from larder.protocol import narinfo, nix32
from larder.protocol.nar import write_nar
from larder.storage.memory import MemoryStorage
from tests.core.gcworld import hash_part, make_world


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


async def test_a_nar_uploaded_again_is_served_from_its_new_record() -> None:
    """A NAR another replica's collection removed (this process was not told) and a pusher
    then uploaded again in another compression is stored otherwise: downloads must take its
    new record, not the one remembered, whose size no longer matches the blob (the short path
    turns every such download away, and the service decodes the whole blob to check it)."""
    storage = MemoryStorage()
    with ThreadPoolExecutor(2) as pool:
        nix = NixCache(BlobStore(storage, pool), served_ttl=60)
        cache, _ = await CacheRegistry(storage).ensure("main")
        nar = write_nar({"type": "regular", "contents": bytes(range(256)) * 400})
        nar_hash = nix32.encode(hashlib.sha256(nar).digest())
        uploads = {
            ".nar.zst": zstandard.ZstdCompressor(level=1).compress(nar),  # kept as it came
            ".nar.xz": lzma.compress(nar),  # stored in larder's own zstd
        }
        names = {ext: nix32.encode(hashlib.sha256(body).digest()) + ext
                 for ext, body in uploads.items()}  # fmt: skip
        first = await nix.upload_nar(cache, names[".nar.zst"], chunks(uploads[".nar.zst"]))
        assert await nix.nar_record(cache, nar_hash, serving=True) == first  # remembered
        await storage.delete(keys.nar("main", nar_hash))  # the other replica's collection
        await storage.blob_delete(first.blob_id)
        again = await nix.upload_nar(cache, names[".nar.xz"], chunks(uploads[".nar.xz"]))
        assert again.stored_size != first.stored_size
        assert await nix.nar_record(cache, nar_hash, serving=True) == again
        assert await storage.blob_stored_size(again.blob_id) == again.stored_size


async def test_a_file_hash_read_back_is_kept_unless_the_record_went_meanwhile() -> None:
    """A record from before FileHash: the first lookup reads the blob and writes the FileHash
    into the record; a record deleted while the blob was read is not brought back."""
    world = await make_world()
    try:
        paths = [await world.push(name) for name in ("kept", "collected", "replaced")]
        records = {}
        for path in paths:
            info = await world.narinfo(path)
            assert info is not None
            older = narinfo.render(dataclasses.replace(info, file_hash=None))  # no FileHash
            await world.storage.put(keys.narinfo("main", hash_part(path)), older.encode())
            key = keys.nar("main", info.nar_hash.nix32())
            old = NarRecord.from_json(await world.storage.get(key) or b"")
            assert old.file_hash is not None
            await world.storage.put(key, dataclasses.replace(old, file_hash=None).to_json())
            records[path] = (key, old.file_hash)
        read_back = world.nix._stored_sha256
        reads = []

        async def collected_meanwhile(blob_id: str) -> bytes | None:
            reads.append(blob_id)
            if len(reads) == 2:
                await world.storage.delete(records[paths[1]][0])
            if len(reads) == 3:  # uploaded again, compressed otherwise
                key = records[paths[2]][0]
                again = dataclasses.replace(
                    NarRecord.from_json(await world.storage.get(key) or b""), uploaded_as="x"
                )
                await world.storage.put(key, again.to_json())
            return await read_back(blob_id)

        world.nix._stored_sha256 = collected_meanwhile  # type: ignore[method-assign]
        await world.use(paths[0])
        key, file_hash = records[paths[0]]
        assert NarRecord.from_json(await world.storage.get(key) or b"").file_hash == file_hash
        await world.use(paths[0])
        assert len(reads) == 1  # the second lookup read the record, not the blob
        await world.use(paths[1])
        assert await world.storage.get(records[paths[1]][0]) is None
        await world.use(paths[2])
        kept = NarRecord.from_json(await world.storage.get(records[paths[2]][0]) or b"")
        assert (kept.uploaded_as, kept.file_hash) == ("x", None)
    finally:
        world.executor.shutdown()
