"""The storage contract: every backend (memory, disk, S3 on moto) must pass all of it."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import zstandard

from larder.errors import VerificationFailed
from larder.storage.base import BlobInfo, Storage
from larder.storage.blobformat import READ_CHUNK
from tests.storage.helpers import (
    Backend,
    blob_id_of,
    decompress,
    mixed_data,
    read_stored,
    write_blob,
)

BAD_KEYS = [
    "",
    ".",
    "..",
    "a/../b",
    "../escape",
    "a/./b",
    "a//b",
    "/abs",
    "trailing/",
    "nul\x00byte",
    "back\\slash",
    "sp ace",
    "new\nline",
    "é",
    "x" * 1025,
]
BAD_BLOB_IDS = ["", "0" * 63, "0" * 65, "A" * 64, "g" * 64, "../" + "0" * 61]


async def collect(iterator: object) -> list[str]:
    return [item async for item in iterator]  # type: ignore[attr-defined]


# -- objects -----------------------------------------------------------------------------


async def test_object_put_get_overwrite_delete(storage: Storage) -> None:
    assert await storage.get("config/thing") is None
    assert await storage.exists("config/thing") is False

    await storage.put("config/thing", b"one")
    assert await storage.get("config/thing") == b"one"
    assert await storage.exists("config/thing") is True

    await storage.put("config/thing", b"two, longer")
    assert await storage.get("config/thing") == b"two, longer"

    await storage.put("config/thing", b"")
    assert await storage.get("config/thing") == b""
    assert await storage.exists("config/thing") is True

    assert await storage.delete("config/thing") is True
    assert await storage.get("config/thing") is None
    assert await storage.exists("config/thing") is False
    assert await storage.delete("config/thing") is False


async def test_object_binary_content_and_key_characters(storage: Storage) -> None:
    data = bytes(range(256)) * 40
    key = "caches/main/file/log/abc-1.2_3:x!y+z=w@v.drv"
    await storage.put(key, data)
    assert await storage.get(key) == data
    assert await collect(storage.keys("caches/main/file/")) == [key]
    # Store path names (hence build log names) may contain '?'.
    question = "caches/main/file/log/abc-what?.drv"
    await storage.put(question, data)
    assert await storage.get(question) == data
    assert await collect(storage.keys("caches/main/file/log/abc-w")) == [question]


async def test_missing_parent_is_a_miss(storage: Storage) -> None:
    await storage.put("a/file", b"x")
    assert await storage.get("a/file/below") is None
    assert await storage.exists("a/file/below") is False
    assert await storage.delete("a/file/below") is False
    assert await storage.get("a") is None  # a "directory" is not an object
    assert await storage.exists("a") is False
    assert await storage.delete("a") is False
    assert await storage.get("a/file") == b"x"


async def test_keys_sorted_and_filtered_by_string_prefix(storage: Storage) -> None:
    names = ["b/2", "a/1", "b/10", "b1", "b/1/deep", "c", "b/x.json"]
    for name in names:
        await storage.put(name, name.encode())
    assert await collect(storage.keys("")) == sorted(names)
    assert await collect(storage.keys("b/")) == ["b/1/deep", "b/10", "b/2", "b/x.json"]
    assert await collect(storage.keys("b")) == ["b/1/deep", "b/10", "b/2", "b/x.json", "b1"]
    assert await collect(storage.keys("b/1")) == ["b/1/deep", "b/10"]
    assert await collect(storage.keys("b/x.")) == ["b/x.json"]
    assert await collect(storage.keys("nothing/")) == []
    assert await collect(storage.keys("zz")) == []
    await storage.delete("b/10")
    assert await collect(storage.keys("b/1")) == ["b/1/deep"]


async def test_keys_ignore_blobs_and_temporaries(backend: Backend) -> None:
    storage = backend.storage
    await storage.put("k", b"v")
    await write_blob(storage, b"blob content")
    writer = await asyncio.to_thread(storage.blob_writer)
    await asyncio.to_thread(writer.write, b"in progress")
    try:
        assert await collect(storage.keys("")) == ["k"]
    finally:
        await asyncio.to_thread(writer.abort)


@pytest.mark.parametrize("prefix", ["../", "a//", "/a", "a/../", "..//x", "sp ace", "x\x00"])
async def test_keys_rejects_bad_prefix(storage: Storage, prefix: str) -> None:
    with pytest.raises(ValueError):
        await collect(storage.keys(prefix))
    with pytest.raises(ValueError):
        await collect(storage.object_infos(prefix))


async def level(storage: Storage, prefix: str, limit: int = 100) -> list[tuple[str, bool]]:
    """``(name, is_level)`` of ``prefix``'s listing."""
    return [(item.name, item.is_level) async for item in storage.list_level(prefix, limit=limit)]


async def test_list_level_lists_one_level_in_key_order(storage: Storage) -> None:
    names = ["b/2", "a/1", "b/10", "b1", "b/1/deep", "c", "b/x.json", "b/1x/deeper/still"]
    for name in names:
        await storage.put(name, name.encode())
    assert await level(storage, "") == [("a", True), ("b", True), ("b1", False), ("c", False)]
    # S3's order: a level sorts as its name and "/" ("b/1/" < "b/10" < "b/1x/")
    assert await level(storage, "b/") == [
        ("1", True), ("10", False), ("1x", True), ("2", False), ("x.json", False)
    ]  # fmt: skip
    assert await level(storage, "b/1x/") == [("deeper", True)]
    assert await level(storage, "b/1x/deeper/") == [("still", False)]
    assert await level(storage, "nothing/") == []
    assert await level(storage, "c/") == []  # an object is not a level


async def test_list_level_describes_objects(storage: Storage) -> None:
    before = time.time()
    await storage.put("lv/obj", b"12345")
    await storage.put("lv/sub/deep", b"x")
    listed = [item async for item in storage.list_level("lv/", limit=10)]
    assert [(item.name, item.is_level) for item in listed] == [("obj", False), ("sub", True)]
    info = listed[0].info
    assert info is not None and (info.key, info.size) == ("lv/obj", 5)
    assert before - 2 <= info.modified <= time.time() + 2  # S3 keeps whole seconds
    assert listed[1].info is None


async def test_list_level_stops_at_the_limit(storage: Storage) -> None:
    for i in range(12):
        await storage.put(f"many/{i:02d}", b"")
        await storage.put(f"many/{i:02d}x/below", b"")
    everything = await level(storage, "many/", limit=100)
    assert len(everything) == 24 and everything == sorted(
        everything, key=lambda item: "many/" + item[0] + ("/" if item[1] else "")
    )
    for limit in (1, 5, 7, 23, 24, 25):
        assert await level(storage, "many/", limit=limit) == everything[:limit]


async def test_list_level_forgets_levels_emptied_by_deletion(storage: Storage) -> None:
    await storage.put("e/f/g/h", b"")
    await storage.put("e/kept/deep/obj", b"")
    await storage.put("top", b"")
    assert await storage.delete("e/f/g/h")
    assert await level(storage, "e/") == [("kept", True)]
    assert await level(storage, "e/f/") == []
    assert await storage.delete("e/kept/deep/obj")
    assert await level(storage, "") == [("top", False)]


async def test_list_level_ignores_blobs_and_temporaries(backend: Backend) -> None:
    storage = backend.storage
    await storage.put("k", b"v")
    await write_blob(storage, b"blob content")
    writer = await asyncio.to_thread(storage.blob_writer)
    await asyncio.to_thread(writer.write, b"in progress")
    try:
        assert await level(storage, "") == [("k", False)]
    finally:
        await asyncio.to_thread(writer.abort)


@pytest.mark.parametrize("prefix", ["a", "a/b", "../", "a//", "/a", "a/../", "sp ace/", "x\x00/"])
async def test_list_level_rejects_what_is_not_a_level(storage: Storage, prefix: str) -> None:
    with pytest.raises(ValueError):
        await level(storage, prefix)


@pytest.mark.parametrize("limit", [0, -1])
async def test_list_level_rejects_a_limit_below_one(storage: Storage, limit: int) -> None:
    with pytest.raises(ValueError):
        await level(storage, "", limit)


async def test_put_if_absent(storage: Storage) -> None:
    assert await storage.put_if_absent("config/secret", b"first") is True
    assert await storage.put_if_absent("config/secret", b"second") is False
    assert await storage.get("config/secret") == b"first"
    await storage.delete("config/secret")
    assert await storage.put_if_absent("config/secret", b"third") is True
    assert await storage.get("config/secret") == b"third"


@pytest.mark.parametrize("racers", [2, 8])
async def test_put_if_absent_race_has_one_winner(storage: Storage, racers: int) -> None:
    for round_number in range(5):
        key = f"config/race-{racers}-{round_number}"
        values = [f"value {i}".encode() * 100 for i in range(racers)]
        results = await asyncio.gather(*(storage.put_if_absent(key, v) for v in values))
        assert results.count(True) == 1, results
        winner = values[results.index(True)]
        reads = await asyncio.gather(*(storage.get(key) for _ in values))
        assert reads == [winner] * racers


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_invalid_keys_raise_before_touching_storage(backend: Backend, key: str) -> None:
    storage = backend.storage
    with pytest.raises(ValueError):
        await storage.put(key, b"x")
    with pytest.raises(ValueError):
        await storage.put_if_absent(key, b"x")
    with pytest.raises(ValueError):
        await storage.get(key)
    with pytest.raises(ValueError):
        await storage.exists(key)
    with pytest.raises(ValueError):
        await storage.delete(key)
    with pytest.raises(ValueError):
        await storage.delete_if_older(key, 0.0)
    with pytest.raises(ValueError):
        await storage.delete_if_older(key, float("inf"))
    assert await collect(storage.keys("")) == []
    assert await backend.leftovers() == []


@pytest.mark.parametrize("blob_id", BAD_BLOB_IDS)
async def test_invalid_blob_ids_raise(storage: Storage, blob_id: str) -> None:
    with pytest.raises(ValueError):
        await storage.blob_open(blob_id)
    with pytest.raises(ValueError):
        await storage.blob_stored_size(blob_id)
    with pytest.raises(ValueError):
        await storage.blob_delete(blob_id)
    with pytest.raises(ValueError):
        await storage.blob_delete_if_older(blob_id, float("inf"))


# -- blobs -------------------------------------------------------------------------------


async def test_blob_roundtrip(backend: Backend) -> None:
    storage = backend.storage
    data = mixed_data(3 * 1024 * 1024 + 12345)
    info = await write_blob(storage, data, piece=100_000)

    assert info == BlobInfo(blob_id_of(data), len(data), info.stored_size)
    assert 0 < info.stored_size < len(data)  # the mixed data does compress
    stored = await read_stored(storage, info.blob_id)
    assert len(stored) == info.stored_size
    assert await storage.blob_stored_size(info.blob_id) == info.stored_size
    assert decompress(stored) == data

    params = zstandard.get_frame_parameters(stored)
    assert params.has_checksum
    assert params.content_size == zstandard.CONTENTSIZE_UNKNOWN
    # exactly one frame: the first frame spans the whole stored blob
    assert zstandard.frame_header_size(stored) > 0
    assert zstandard.ZstdDecompressor().decompressobj().decompress(stored) == data
    assert await backend.leftovers() == []


async def test_blob_reader_chunks_are_bounded(storage: Storage) -> None:
    data = os.urandom(1024 * 1024 + 7)  # incompressible: stored is a bit larger
    info = await write_blob(storage, data)
    reader = await storage.blob_open(info.blob_id)
    assert reader is not None
    try:
        assert reader.stored_size == info.stored_size
        sizes = [len(chunk) async for chunk in reader.chunks()]
    finally:
        await reader.close()
    assert sum(sizes) == info.stored_size
    assert max(sizes) <= READ_CHUNK
    assert len(sizes) >= info.stored_size // READ_CHUNK


async def test_blob_ranged_reads(storage: Storage) -> None:
    data = mixed_data(2 * 1024 * 1024)
    info = await write_blob(storage, data)
    stored = await read_stored(storage, info.blob_id)
    size = info.stored_size
    spans: list[tuple[int, int | None]] = [
        (0, None),
        (0, 1),
        (1, 2),
        (0, size),
        (size - 1, size),
        (size, None),
        (size, size),
        (17, 17),
        (100, 300_000),
        (READ_CHUNK - 1, READ_CHUNK + 1),
        (size // 2, None),
        (5, size + 1000),  # an end past the blob is clamped
        (size + 10, size + 20),
    ]
    for start, end in spans:
        expected = stored[start:end]
        assert await read_stored(storage, info.blob_id, start, end) == expected, (start, end)

    reader = await storage.blob_open(info.blob_id)
    assert reader is not None
    try:
        with pytest.raises(ValueError):
            [chunk async for chunk in reader.chunks(-1, 10)]
        with pytest.raises(ValueError):
            [chunk async for chunk in reader.chunks(10, 5)]
        # a reader serves several ranges
        first = b"".join([c async for c in reader.chunks(0, 10)])
        second = b"".join([c async for c in reader.chunks(10, 20)])
        assert first + second == stored[:20]
    finally:
        await reader.close()


async def test_empty_blob(backend: Backend) -> None:
    storage = backend.storage
    info = await write_blob(storage, b"")
    assert info.blob_id == blob_id_of(b"")
    assert info.size == 0
    stored = await read_stored(storage, info.blob_id)
    assert len(stored) == info.stored_size > 0  # a zstd frame even for no bytes
    assert decompress(stored) == b""
    assert await collect(storage.blob_ids()) == [info.blob_id]
    assert await backend.leftovers() == []


async def test_writer_size_and_closed_state(storage: Storage) -> None:
    def work() -> BlobInfo:
        writer = storage.blob_writer()
        assert writer.size == 0
        writer.write(b"abc")
        writer.write(memoryview(b"defgh"))
        writer.write(memoryview(bytearray(b"ij")))
        assert writer.size == 10
        info = writer.commit()
        with pytest.raises(ValueError):
            writer.write(b"more")
        with pytest.raises(ValueError):
            writer.commit()
        writer.abort()  # a no-op after commit
        return info

    info = await asyncio.to_thread(work)
    assert info.size == 10
    assert info.blob_id == blob_id_of(b"abcdefghij")
    assert decompress(await read_stored(storage, info.blob_id)) == b"abcdefghij"


async def test_aborted_writer_leaves_nothing(backend: Backend) -> None:
    storage = backend.storage
    data = mixed_data(600_000)

    def work() -> None:
        writer = storage.blob_writer()
        writer.write(data)
        writer.abort()
        writer.abort()  # twice is fine
        with pytest.raises(ValueError):
            writer.write(b"x")
        with pytest.raises(ValueError):
            writer.commit()

    await asyncio.to_thread(work)
    assert await storage.blob_open(blob_id_of(data)) is None
    assert await collect(storage.blob_ids()) == []
    assert await backend.leftovers() == []


async def test_exception_in_with_block_leaves_nothing(backend: Backend) -> None:
    storage = backend.storage
    data = mixed_data(600_000, seed=1)

    def work() -> None:
        with pytest.raises(RuntimeError, match="verification failed"), storage.blob_writer() as w:
            w.write(data)
            raise RuntimeError("verification failed")

    await asyncio.to_thread(work)
    assert await storage.blob_open(blob_id_of(data)) is None
    assert await storage.blob_stored_size(blob_id_of(data)) is None
    assert await collect(storage.blob_ids()) == []
    assert await backend.leftovers() == []


async def test_commit_with_the_wrong_expected_id_leaves_nothing(backend: Backend) -> None:
    storage = backend.storage
    data = mixed_data(200_000, seed=5)

    def work(expected: str) -> BlobInfo:
        with storage.blob_writer() as writer:
            writer.write(data)
            return writer.commit(expected)

    with pytest.raises(VerificationFailed, match="content hash mismatch"):
        await asyncio.to_thread(work, "0" * 64)
    assert await collect(storage.blob_ids()) == []
    assert await backend.leftovers() == []
    info = await asyncio.to_thread(work, blob_id_of(data))
    assert await collect(storage.blob_ids()) == [info.blob_id]


async def test_uncommitted_blob_is_invisible(backend: Backend) -> None:
    storage = backend.storage
    data = mixed_data(300_000, seed=2)
    writer = await asyncio.to_thread(storage.blob_writer)
    try:
        await asyncio.to_thread(writer.write, data)
        assert await storage.blob_open(blob_id_of(data)) is None
        assert await storage.blob_stored_size(blob_id_of(data)) is None
        assert await collect(storage.blob_ids()) == []
        info = await asyncio.to_thread(writer.commit)
    finally:
        await asyncio.to_thread(writer.abort)
    assert await collect(storage.blob_ids()) == [info.blob_id]
    assert decompress(await read_stored(storage, info.blob_id)) == data
    assert await backend.leftovers() == []


async def test_same_content_is_stored_once(backend: Backend) -> None:
    storage = backend.storage
    data = mixed_data(200_000, seed=3)
    first = await write_blob(storage, data, piece=1000)
    second = await write_blob(storage, data, piece=77_777)
    assert first == second
    assert await collect(storage.blob_ids()) == [first.blob_id]
    assert await backend.leftovers() == []


async def test_concurrent_identical_uploads(backend: Backend) -> None:
    storage = backend.storage
    data = mixed_data(700_000, seed=4)
    barrier = threading.Barrier(8)

    def upload() -> BlobInfo:
        with storage.blob_writer() as writer:
            writer.write(data)
            barrier.wait(timeout=30)
            return writer.commit()

    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(8) as pool:
        infos = await asyncio.gather(*(loop.run_in_executor(pool, upload) for _ in range(8)))
    assert {info.blob_id for info in infos} == {blob_id_of(data)}
    assert len(set(infos)) == 1
    assert await collect(storage.blob_ids()) == [blob_id_of(data)]
    assert decompress(await read_stored(storage, blob_id_of(data))) == data
    assert await backend.leftovers() == []


async def test_concurrent_different_uploads(storage: Storage) -> None:
    blobs = [mixed_data(150_000, seed=10 + i) for i in range(6)]
    infos = await asyncio.gather(*(write_blob(storage, data) for data in blobs))
    assert sorted(await collect(storage.blob_ids())) == sorted(blob_id_of(d) for d in blobs)
    for info, data in zip(infos, blobs, strict=True):
        assert decompress(await read_stored(storage, info.blob_id)) == data


async def test_blob_delete(storage: Storage) -> None:
    info = await write_blob(storage, b"short-lived")
    keep = await write_blob(storage, b"kept")
    assert await storage.blob_delete(info.blob_id) is True
    assert await storage.blob_open(info.blob_id) is None
    assert await storage.blob_stored_size(info.blob_id) is None
    assert await storage.blob_delete(info.blob_id) is False
    assert await collect(storage.blob_ids()) == [keep.blob_id]
    # and it can come back
    again = await write_blob(storage, b"short-lived")
    assert again == info
    assert decompress(await read_stored(storage, info.blob_id)) == b"short-lived"


async def test_missing_blob_is_a_miss(storage: Storage) -> None:
    missing = blob_id_of(b"never written")
    assert await storage.blob_open(missing) is None
    assert await storage.blob_stored_size(missing) is None
    assert await storage.blob_delete(missing) is False


async def test_blob_ids_lists_committed_only(backend: Backend) -> None:
    storage = backend.storage
    committed = [await write_blob(storage, f"blob {i}".encode() * 1000) for i in range(5)]
    pending = await asyncio.to_thread(storage.blob_writer)
    await asyncio.to_thread(pending.write, b"pending" * 1000)
    try:
        ids = await collect(storage.blob_ids())
        assert sorted(ids) == sorted(info.blob_id for info in committed)
        assert len(ids) == len(set(ids))
    finally:
        await asyncio.to_thread(pending.abort)
    assert await backend.leftovers() == []


async def test_blobs_and_objects_are_separate(storage: Storage) -> None:
    info = await write_blob(storage, b"content")
    await storage.put(info.blob_id, b"object named like a blob")
    assert await storage.get(info.blob_id) == b"object named like a blob"
    assert decompress(await read_stored(storage, info.blob_id)) == b"content"
    assert await collect(storage.blob_ids()) == [info.blob_id]
    assert await collect(storage.keys("")) == [info.blob_id]


async def test_local_path_only_for_disk(backend: Backend) -> None:
    info = await write_blob(backend.storage, b"local?")
    reader = await backend.storage.blob_open(info.blob_id)
    assert reader is not None
    try:
        if backend.name == "disk":
            assert reader.local_path is not None
            assert reader.local_path.read_bytes() == await read_stored(
                backend.storage, info.blob_id
            )
        else:
            assert reader.local_path is None
    finally:
        await reader.close()


async def test_check(storage: Storage) -> None:
    await storage.check()


async def test_writer_from_many_threads_sequentially(storage: Storage) -> None:
    """Callers drive one writer from whichever executor thread is free."""
    data = mixed_data(500_000, seed=5)
    writer = await asyncio.to_thread(storage.blob_writer)
    try:
        for offset in range(0, len(data), 50_000):
            await asyncio.to_thread(writer.write, data[offset : offset + 50_000])
        info = await asyncio.to_thread(writer.commit)
    finally:
        await asyncio.to_thread(writer.abort)
    assert info.blob_id == blob_id_of(data)


# -- blobs kept in the encoding they came in -----------------------------------------------


async def test_an_encoded_writer_stores_the_given_stream_as_it_is(backend: Backend) -> None:
    storage = backend.storage
    data = mixed_data(700_000, seed=11)
    stream = zstandard.ZstdCompressor(level=1, write_checksum=False).compress(data)

    def work() -> BlobInfo:
        with storage.blob_writer(encoded=True) as writer:
            for offset in range(0, len(stream), 100_000):
                writer.write_encoded(stream[offset : offset + 100_000])
            for offset in range(0, len(data), 64 * 1024):
                writer.write(data[offset : offset + 64 * 1024])
            return writer.commit(stored_sha256=hashlib.sha256(stream).digest())

    info = await asyncio.to_thread(work)
    assert info == BlobInfo(blob_id_of(data), len(data), len(stream))
    assert info.stored_sha256 == hashlib.sha256(stream).digest()
    assert await read_stored(storage, info.blob_id) == stream  # not re-encoded
    assert await storage.blob_stored_size(info.blob_id) == len(stream)
    assert await backend.leftovers() == []


async def test_content_stored_again_in_another_encoding_reports_what_is_kept(
    storage: Storage,
) -> None:
    data = mixed_data(300_000, seed=12)
    first = await write_blob(storage, data)  # larder's own encoding
    other = zstandard.ZstdCompressor(level=19, write_checksum=False).compress(data)
    assert len(other) != first.stored_size

    def work() -> BlobInfo:
        with storage.blob_writer(encoded=True) as writer:
            writer.write_encoded(other)
            writer.write(data)
            return writer.commit(stored_sha256=hashlib.sha256(other).digest())

    again = await asyncio.to_thread(work)
    assert again.blob_id == first.blob_id
    kept = await read_stored(storage, again.blob_id)
    assert again.stored_size == len(kept) == await storage.blob_stored_size(again.blob_id)
    assert decompress(kept) == data
    # The first bytes stay (records and narinfos made from them describe them); the writer
    # whose bytes did not stay reports the sha256 of those at rest, or none.
    assert kept != other and again.stored_sha256 in (None, hashlib.sha256(kept).digest())
    assert again.stored_size == first.stored_size


async def test_content_stored_again_is_made_fresh(storage: Storage) -> None:
    data = mixed_data(200_000, seed=14)
    first = await write_blob(storage, data)
    before = time.time()
    await asyncio.sleep(2.1)  # S3 keeps whole seconds: the refresh is at least 1.1 s later
    cutoff = time.time() - 1.0
    again = await write_blob(storage, data)
    assert again.blob_id == first.blob_id
    # Garbage collection's age check: the blob counts as written now, not at first.
    assert not await storage.blob_delete_if_older(first.blob_id, cutoff)
    infos = [info async for info in storage.blob_infos() if info.blob_id == first.blob_id]
    assert len(infos) == 1 and infos[0].modified >= before


async def test_a_commit_reports_the_sha256_of_its_bytes_at_rest(storage: Storage) -> None:
    data = mixed_data(500_000, seed=13)
    info = await write_blob(storage, data)
    assert info.stored_sha256 == hashlib.sha256(await read_stored(storage, info.blob_id)).digest()


async def test_write_encoded_is_refused_by_a_writer_that_encodes(storage: Storage) -> None:
    def work() -> None:
        with (
            storage.blob_writer() as writer,
            pytest.raises(ValueError, match="encodes the stream itself"),
        ):
            writer.write_encoded(b"\x28\xb5\x2f\xfd")

    await asyncio.to_thread(work)
    assert await collect(storage.blob_ids()) == []
