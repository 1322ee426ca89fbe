"""Modification times and age-conditional deletes, the interface garbage collection relies on.

The contract part runs over memory, disk and S3 (moto); then what only the disk backend does
(racing writes around its rename-check-relink deletion), S3's listing-based ages and multipart
commits, and the instrumented wrapper.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from larder.errors import StorageUnavailable
from larder.service.observability.instrumented_storage import InstrumentedStorage
from larder.service.observability.metrics import Metrics
from larder.storage.base import ObjectInfo, Storage, StoredBlob
from larder.storage.disk import DiskStorage
from larder.storage.memory import MemoryStorage
from larder.storage.s3 import MIN_PART_SIZE
from tests.storage.helpers import (
    Backend,
    S3Bucket,
    blob_id_of,
    decompress,
    mixed_data,
    read_stored,
    write_blob,
    write_blob_sync,
)

PAST = 1_000_000_000.0  # September 2001: before anything these tests write
DAY = 86_400.0


def future() -> float:
    return time.time() + 10 * DAY


async def object_infos(storage: Storage, prefix: str = "") -> list[ObjectInfo]:
    return [info async for info in storage.object_infos(prefix)]


async def object_info(storage: Storage, key: str) -> ObjectInfo:
    (info,) = [info for info in await object_infos(storage, key) if info.key == key]
    return info


async def blob_infos(storage: Storage) -> dict[str, StoredBlob]:
    infos = [info async for info in storage.blob_infos()]
    by_id = {info.blob_id: info for info in infos}
    assert len(by_id) == len(infos), "a blob is listed twice"
    return by_id


async def keys(storage: Storage, prefix: str = "") -> list[str]:
    return [key async for key in storage.keys(prefix)]


async def wait_past(backend: Backend, modified: float) -> None:
    """Sleep until a write gets a modification time later than ``modified``.

    S3 reports whole seconds (truncated); a file's mtime comes from the kernel's coarse clock.
    """
    target = modified + (1.05 if backend.name == "s3" else 0.05)
    while (delay := target - time.time()) > 0:
        await asyncio.sleep(delay)


def assert_recent(modified: float, before: float, after: float) -> None:
    # S3 truncates to the second; a file's mtime may lag time.time() by a clock tick
    assert before - 1.5 <= modified <= after + 1.0, (before, modified, after)


# -- object_infos ------------------------------------------------------------------------


async def test_object_infos_sizes_order_and_prefixes(storage: Storage) -> None:
    before = time.time()
    contents = {
        "b/2": b"",
        "a/1": b"x",
        "b/10": b"ten bytes!",
        "b1": b"b" * 1000,
        "b/1/deep": bytes(range(256)),
        "c": b"cc",
    }
    for key, data in contents.items():
        await storage.put(key, data)
    after = time.time()

    infos = await object_infos(storage)
    assert [info.key for info in infos] == sorted(contents)
    for info in infos:
        assert info.size == len(contents[info.key]), info
        assert_recent(info.modified, before, after)
    for prefix in ["", "b/", "b", "b/1", "b/1/", "nothing/", "zz", "a/1"]:
        listed = [info.key for info in await object_infos(storage, prefix)]
        assert listed == await keys(storage, prefix), prefix
        assert listed == sorted(k for k in contents if k.startswith(prefix)), prefix
    await storage.delete("b/10")
    assert [info.key for info in await object_infos(storage, "b/1")] == ["b/1/deep"]


async def test_object_infos_ignore_blobs_and_temporaries(storage: Storage) -> None:
    await storage.put("k", b"v")
    await write_blob(storage, b"blob content")
    writer = await asyncio.to_thread(storage.blob_writer)
    await asyncio.to_thread(writer.write, b"in progress")
    try:
        assert [info.key for info in await object_infos(storage)] == ["k"]
    finally:
        await asyncio.to_thread(writer.abort)


async def test_object_modified_moves_forward_on_rewrite(backend: Backend) -> None:
    storage = backend.storage
    await storage.put("config/thing", b"one")
    await storage.put("config/other", b"untouched")
    first = await object_info(storage, "config/thing")
    other = await object_info(storage, "config/other")
    await wait_past(backend, max(first.modified, other.modified))

    await storage.put("config/thing", b"two, longer")
    second = await object_info(storage, "config/thing")
    assert second.size == len(b"two, longer")
    assert second.modified > first.modified
    assert await object_info(storage, "config/other") == other

    # a put_if_absent that loses writes nothing; one that creates sets the time
    await wait_past(backend, second.modified)
    assert await storage.put_if_absent("config/thing", b"three") is False
    assert await object_info(storage, "config/thing") == second
    before = time.time()
    assert await storage.put_if_absent("config/new", b"created") is True
    created = await object_info(storage, "config/new")
    assert created.size == len(b"created")
    assert_recent(created.modified, before, time.time())
    assert created.modified > second.modified


# -- blob_infos --------------------------------------------------------------------------


async def test_blob_infos_list_committed_blobs_with_stored_sizes(backend: Backend) -> None:
    storage = backend.storage
    assert await blob_infos(storage) == {}
    before = time.time()
    committed = [await write_blob(storage, mixed_data(50_000 * (i + 1), seed=i)) for i in range(4)]
    committed.append(await write_blob(storage, b""))
    after = time.time()
    pending = await asyncio.to_thread(storage.blob_writer)
    await asyncio.to_thread(pending.write, b"pending" * 1000)
    try:
        listed = await blob_infos(storage)
    finally:
        await asyncio.to_thread(pending.abort)

    assert set(listed) == {info.blob_id for info in committed}
    for info in committed:
        assert listed[info.blob_id].stored_size == info.stored_size
        assert listed[info.blob_id].stored_size == await storage.blob_stored_size(info.blob_id)
        assert_recent(listed[info.blob_id].modified, before, after)
    assert sorted(listed) == sorted([blob_id async for blob_id in storage.blob_ids()])

    await storage.blob_delete(committed[0].blob_id)
    assert set(await blob_infos(storage)) == {info.blob_id for info in committed[1:]}
    assert await backend.leftovers() == []


async def test_blob_infos_ignore_objects(storage: Storage) -> None:
    info = await write_blob(storage, b"content")
    await storage.put(info.blob_id, b"object named like a blob")
    await storage.put("blobs/" + info.blob_id[:2] + "/" + blob_id_of(b"x"), b"not a blob")
    assert set(await blob_infos(storage)) == {info.blob_id}


async def test_dedup_commit_refreshes_blob_modified(backend: Backend) -> None:
    storage = backend.storage
    data = mixed_data(200_000, seed=7)
    info = await write_blob(storage, data)
    first = (await blob_infos(storage))[info.blob_id]
    await wait_past(backend, first.modified)

    again = await write_blob(storage, data, piece=33_333)
    assert again == info
    second = (await blob_infos(storage))[info.blob_id]
    assert second.stored_size == first.stored_size
    assert second.modified > first.modified
    # a collector that judged the blob old before the second commit must now keep it
    cutoff = (first.modified + second.modified) / 2
    assert await storage.blob_delete_if_older(info.blob_id, cutoff) is False
    assert decompress(await read_stored(storage, info.blob_id)) == data
    assert await backend.leftovers() == []


# -- delete_if_older ---------------------------------------------------------------------


async def test_delete_if_older(backend: Backend) -> None:
    storage = backend.storage
    await storage.put("caches/main/narinfo/a", b"a")
    await storage.put("caches/main/narinfo/b", b"b")
    info = await object_info(storage, "caches/main/narinfo/a")

    assert await storage.delete_if_older("caches/main/narinfo/a", PAST) is False
    # strictly before: an object written at the cutoff is kept
    assert await storage.delete_if_older("caches/main/narinfo/a", info.modified) is False
    assert await storage.get("caches/main/narinfo/a") == b"a"

    assert await storage.delete_if_older("caches/main/narinfo/a", info.modified + 0.001) is True
    assert await storage.get("caches/main/narinfo/a") is None
    assert await storage.exists("caches/main/narinfo/a") is False
    assert await storage.delete_if_older("caches/main/narinfo/a", future()) is False
    assert await keys(storage) == ["caches/main/narinfo/b"]

    assert await storage.delete_if_older("caches/main/narinfo/b", future()) is True
    assert await keys(storage) == []
    # and the key can be written again
    await storage.put("caches/main/narinfo/a", b"again")
    assert await storage.get("caches/main/narinfo/a") == b"again"
    assert await backend.leftovers() == []


async def test_delete_if_older_misses(backend: Backend) -> None:
    storage = backend.storage
    await storage.put("a/file", b"x")
    await storage.put("dir/inside", b"y")
    assert await storage.delete_if_older("never/written", future()) is False
    assert await storage.delete_if_older("a/file/below", future()) is False
    # a "directory" is not an object, and nothing under it goes
    assert await storage.delete_if_older("dir", future()) is False
    assert await storage.delete_if_older("a", future()) is False
    assert await storage.get("dir/inside") == b"y"
    assert await storage.get("a/file") == b"x"
    assert await keys(storage) == ["a/file", "dir/inside"]
    assert await backend.leftovers() == []


async def test_delete_if_older_leaves_blobs_alone(storage: Storage) -> None:
    info = await write_blob(storage, b"content")
    assert await storage.delete_if_older(info.blob_id, future()) is False
    assert await storage.blob_stored_size(info.blob_id) == info.stored_size
    await storage.put(info.blob_id, b"object")
    assert await storage.blob_delete_if_older(info.blob_id, future()) is True
    assert await storage.get(info.blob_id) == b"object"


async def test_blob_delete_if_older(backend: Backend) -> None:
    storage = backend.storage
    gone = await write_blob(storage, b"short-lived")
    keep = await write_blob(storage, b"kept")
    modified = (await blob_infos(storage))[gone.blob_id].modified

    assert await storage.blob_delete_if_older(gone.blob_id, PAST) is False
    assert await storage.blob_delete_if_older(gone.blob_id, modified) is False
    assert await storage.blob_stored_size(gone.blob_id) == gone.stored_size

    assert await storage.blob_delete_if_older(gone.blob_id, modified + 0.001) is True
    assert await storage.blob_open(gone.blob_id) is None
    assert await storage.blob_stored_size(gone.blob_id) is None
    assert await storage.blob_delete_if_older(gone.blob_id, future()) is False
    assert set(await blob_infos(storage)) == {keep.blob_id}
    missing = blob_id_of(b"never written")
    assert await storage.blob_delete_if_older(missing, future()) is False

    # it can come back
    assert await write_blob(storage, b"short-lived") == gone
    assert decompress(await read_stored(storage, gone.blob_id)) == b"short-lived"
    assert await backend.leftovers() == []


# -- disk: mtimes, and writes racing a delete --------------------------------------------


def set_mtime(path: Path, when: float) -> None:
    os.utime(path, (when, when))


def temporaries(root: Path) -> list[str]:
    return sorted(path.name for path in (root / "tmp").iterdir())


async def test_disk_ages_are_mtimes(tmp_path: Path) -> None:
    storage = DiskStorage(tmp_path)
    await storage.put("caches/x", b"12345")
    info = await write_blob(storage, b"blob")
    set_mtime(tmp_path / "objects" / "caches" / "x", 1_500_000_000.0)
    set_mtime(tmp_path / "blobs" / info.blob_id[:2] / info.blob_id, 1_600_000_000.0)

    assert await object_infos(storage) == [ObjectInfo("caches/x", 5, 1_500_000_000.0)]
    assert await blob_infos(storage) == {
        info.blob_id: StoredBlob(info.blob_id, info.stored_size, 1_600_000_000.0)
    }
    assert await storage.delete_if_older("caches/x", 1_500_000_000.0) is False
    assert await storage.blob_delete_if_older(info.blob_id, 1_600_000_000.0) is False
    assert await storage.delete_if_older("caches/x", 1_500_000_000.5) is True
    assert await storage.blob_delete_if_older(info.blob_id, 1_600_000_000.5) is True
    assert await object_infos(storage) == []
    assert await blob_infos(storage) == {}
    assert temporaries(tmp_path) == []


async def test_disk_dedup_commit_refreshes_mtime(tmp_path: Path) -> None:
    storage = DiskStorage(tmp_path)
    data = mixed_data(100_000, seed=8)
    info = await write_blob(storage, data)
    other = await write_blob(storage, b"not uploaded again")
    long_ago = time.time() - 30 * DAY
    for blob_id in (info.blob_id, other.blob_id):
        set_mtime(tmp_path / "blobs" / blob_id[:2] / blob_id, long_ago)
    assert (await blob_infos(storage))[info.blob_id].modified == long_ago

    before = time.time()
    assert await write_blob(storage, data) == info
    modified = (await blob_infos(storage))[info.blob_id].modified
    assert_recent(modified, before, time.time())
    cutoff = time.time() - DAY
    assert await storage.blob_delete_if_older(info.blob_id, cutoff) is False
    assert await storage.blob_delete_if_older(other.blob_id, cutoff) is True
    assert decompress(await read_stored(storage, info.blob_id)) == data
    assert temporaries(tmp_path) == []


async def test_disk_commit_relinks_a_blob_deleted_before_its_refresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The content exists when the commit links, and is gone (GC) when it refreshes the mtime."""
    storage = DiskStorage(tmp_path)
    data = mixed_data(100_000, seed=9)
    info = await write_blob(storage, data)
    final = tmp_path / "blobs" / info.blob_id[:2] / info.blob_id
    set_mtime(final, time.time() - 30 * DAY)
    real_utime = os.utime
    raced: list[bool] = []

    def utime_after_a_delete(path: Any, *args: Any, **kwargs: Any) -> None:
        if Path(path) == final and not raced:
            raced.append(True)
            os.unlink(final)
        real_utime(path, *args, **kwargs)

    monkeypatch.setattr(os, "utime", utime_after_a_delete)
    before = time.time()
    assert await write_blob(storage, data) == info
    monkeypatch.undo()

    assert raced == [True]
    assert decompress(await read_stored(storage, info.blob_id)) == data
    assert_recent((await blob_infos(storage))[info.blob_id].modified, before, time.time())
    assert temporaries(tmp_path) == []


def rename_with_writes(
    monkeypatch: pytest.MonkeyPatch,
    before: Callable[[Path], None] | None = None,
    after: Callable[[Path], None] | None = None,
) -> list[Path]:
    """Patch ``os.rename`` so that ``before``/``after`` run around the delete's rename into
    ``tmp/`` (once); returns the list the taken paths are recorded in."""
    real_rename = os.rename
    taken: list[Path] = []

    def rename(source: Any, target: Any, **kwargs: Any) -> None:
        if taken or not Path(target).name.startswith("delete-"):
            return real_rename(source, target, **kwargs)
        taken.append(Path(target))
        if before is not None:
            before(Path(source))
        real_rename(source, target, **kwargs)
        if after is not None:
            after(Path(source))

    monkeypatch.setattr(os, "rename", rename)
    return taken


@pytest.mark.parametrize(
    ("writes", "deleted", "survivor"),
    [
        (["before"], False, b"written before the rename"),  # taken fresh: put back
        (["after"], True, b"written after the rename"),  # the old one goes, the new stays
        (["before", "after"], False, b"written after the rename"),  # newer already there
        ([], True, None),
    ],
)
async def test_disk_delete_if_older_keeps_racing_writes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    writes: list[str],
    deleted: bool,
    survivor: bytes | None,
) -> None:
    storage = DiskStorage(tmp_path)
    key = "caches/main/narinfo/raced"
    await storage.put(key, b"old")
    path = tmp_path / "objects" / key
    set_mtime(path, time.time() - 30 * DAY)

    def write(data: bytes) -> Callable[[Path], None]:
        def run(source: Path) -> None:
            assert source == path
            storage._put_sync(source, data)  # a concurrent put, between the delete's steps

        return run

    taken = rename_with_writes(
        monkeypatch,
        before=write(b"written before the rename") if "before" in writes else None,
        after=write(b"written after the rename") if "after" in writes else None,
    )
    result = await storage.delete_if_older(key, time.time() - DAY)
    monkeypatch.undo()

    assert len(taken) == 1
    assert result is deleted
    assert await storage.get(key) == survivor
    assert temporaries(tmp_path) == []
    if survivor is not None:
        assert await keys(storage) == [key]
        assert (await object_info(storage, key)).modified > time.time() - DAY


@pytest.mark.parametrize("when", ["before", "after"])
async def test_disk_blob_delete_if_older_keeps_a_racing_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    storage = DiskStorage(tmp_path)
    data = mixed_data(150_000, seed=11)
    info = await write_blob(storage, data)
    set_mtime(tmp_path / "blobs" / info.blob_id[:2] / info.blob_id, time.time() - 30 * DAY)

    def commit(source: Path) -> None:
        assert source.name == info.blob_id
        assert write_blob_sync(storage, data) == info  # the same content uploaded again

    taken = rename_with_writes(monkeypatch, **{when: commit})
    result = await storage.blob_delete_if_older(info.blob_id, time.time() - DAY)
    monkeypatch.undo()

    assert len(taken) == 1
    # before: the commit refreshed the file the delete then took, so it went back;
    # after: the delete took the old file and the commit linked a new one
    assert result is (when == "after")
    assert decompress(await read_stored(storage, info.blob_id)) == data
    assert (await blob_infos(storage))[info.blob_id].modified > time.time() - DAY
    assert temporaries(tmp_path) == []


async def test_disk_fresh_objects_are_not_moved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delete that finds the object fresh does not touch it (readers never miss it)."""
    storage = DiskStorage(tmp_path)
    await storage.put("k", b"v")
    info = await write_blob(storage, b"blob")
    taken = rename_with_writes(monkeypatch)
    assert await storage.delete_if_older("k", time.time() - DAY) is False
    assert await storage.blob_delete_if_older(info.blob_id, time.time() - DAY) is False
    monkeypatch.undo()
    assert taken == []


# -- S3: ages come from the listing, and multipart commits refresh them ------------------


@pytest.mark.s3
async def test_s3_infos_do_not_head_each_object(s3_bucket: S3Bucket) -> None:
    storage = s3_bucket.make_storage()
    calls: list[str] = []

    def count(event_name: str, **kwargs: Any) -> None:
        calls.append(event_name.rsplit(".", 1)[-1])

    try:
        for i in range(5):
            await storage.put(f"k/{i}", b"x" * i)
            await write_blob(storage, b"blob %d" % i)
        storage._client.meta.events.register("before-call.s3", count)
        infos = await object_infos(storage, "k/")
        blobs = await blob_infos(storage)
        assert [info.size for info in infos] == [0, 1, 2, 3, 4]
        assert len(blobs) == 5
        assert calls and set(calls) == {"ListObjectsV2"}
    finally:
        await storage.close()


@pytest.mark.s3
async def test_s3_multipart_dedup_commit_refreshes_modified(s3_bucket: S3Bucket) -> None:
    storage = s3_bucket.make_storage(part_size=MIN_PART_SIZE)
    data = os.urandom(6 * 1024 * 1024)  # incompressible: one full part and a remainder
    try:
        info = await write_blob(storage, data, piece=1024 * 1024)
        first = (await blob_infos(storage))[info.blob_id]
        while time.time() < first.modified + 1.05:
            await asyncio.sleep(0.1)
        assert await write_blob(storage, data, piece=1024 * 1024) == info
        second = (await blob_infos(storage))[info.blob_id]
        assert second.modified > first.modified
        assert second.stored_size == info.stored_size
        assert await asyncio.to_thread(s3_bucket.keys) == [
            f"pfx/blobs/{info.blob_id[:2]}/{info.blob_id}"
        ]
        assert await asyncio.to_thread(s3_bucket.uploads) == []
    finally:
        await storage.close()


# -- the instrumented wrapper ------------------------------------------------------------


async def test_instrumented_storage_counts_the_age_operations() -> None:
    class Failing(MemoryStorage):
        async def delete_if_older(self, key: str, cutoff: float) -> bool:
            raise StorageUnavailable("down")

    metrics = Metrics("memory")
    storage = InstrumentedStorage(Failing(), metrics)

    def count(name: str, operation: str) -> float:
        labels = {"backend": "memory", "operation": operation}
        value = metrics.registry.get_sample_value(name, labels)
        return value or 0.0

    await storage.put("k", b"v")
    info = await write_blob(storage, b"blob")
    assert [i.key for i in await object_infos(storage)] == ["k"]
    assert set(await blob_infos(storage)) == {info.blob_id}
    assert await storage.blob_delete_if_older(info.blob_id, future()) is True
    with pytest.raises(StorageUnavailable):
        await storage.delete_if_older("k", future())
    for operation in ("object_infos", "blob_infos", "blob_delete_if_older", "delete_if_older"):
        assert count("larder_backend_operations_total", operation) == 1, operation
    assert count("larder_backend_errors_total", "delete_if_older") == 1
    assert count("larder_backend_errors_total", "blob_delete_if_older") == 0
