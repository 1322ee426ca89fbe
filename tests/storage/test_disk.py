"""What only the disk backend promises: its layout, crash safety, a full disk, OS errors."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import larder.storage.disk as disk_module
from larder.core import keys
from larder.errors import Conflict, StorageError, StorageFull, StorageUnavailable
from larder.storage.base import PRIVATE_PREFIX
from larder.storage.disk import DiskStorage
from tests.storage.helpers import blob_id_of, decompress, mixed_data, read_stored, write_blob


def temporaries(root: Path) -> list[str]:
    return sorted(path.name for path in (root / "tmp").iterdir())


def blob_files(root: Path) -> list[str]:
    return sorted(path.name for path in (root / "blobs").rglob("*") if path.is_file())


async def test_layout(tmp_path: Path) -> None:
    storage = DiskStorage(tmp_path)
    data = mixed_data(100_000)
    info = await write_blob(storage, data)
    path = tmp_path / "blobs" / info.blob_id[:2] / info.blob_id
    assert path.read_bytes() == await read_stored(storage, info.blob_id)
    assert decompress(path.read_bytes()) == data  # a blob file is a servable .zst
    assert path.stat().st_mode & 0o022 == 0

    await storage.put("caches/main/narinfo/abc", b"narinfo")
    assert (tmp_path / "objects" / "caches" / "main" / "narinfo" / "abc").read_bytes() == (
        b"narinfo"
    )
    assert temporaries(tmp_path) == []
    assert repr(storage) == f"DiskStorage({str(tmp_path)!r})"


async def test_reader_survives_delete(tmp_path: Path) -> None:
    storage = DiskStorage(tmp_path)
    data = os.urandom(1024 * 1024)
    info = await write_blob(storage, data)
    reader = await storage.blob_open(info.blob_id)
    assert reader is not None
    try:
        assert await storage.blob_delete(info.blob_id) is True
        assert await storage.blob_open(info.blob_id) is None
        stored = b"".join([chunk async for chunk in reader.chunks()])
    finally:
        await reader.close()
    assert len(stored) == info.stored_size
    assert decompress(stored) == data


async def test_key_that_is_also_a_directory(tmp_path: Path) -> None:
    storage = DiskStorage(tmp_path)
    await storage.put("a/b", b"below")
    with pytest.raises(Conflict, match="directory of another key"):
        await storage.put("a", b"above")
    with pytest.raises(Conflict, match="directory of another key"):
        await storage.put("a/b/c", b"further below")
    with pytest.raises(Conflict, match="directory of another key"):
        await storage.put_if_absent("a/b/c", b"further below")
    assert await storage.get("a/b") == b"below"
    assert [key async for key in storage.keys("")] == ["a/b"]
    assert temporaries(tmp_path) == []


async def test_a_level_listing_reads_one_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = DiskStorage(tmp_path)
    for i in range(3):
        for j in range(20):
            await storage.put(f"top/d{i}/x{j:02d}/k", b"")
    await storage.put("top/f", b"12")
    opened: list[str] = []
    scandir = os.scandir

    def counting_scandir(path: str | Path) -> Iterator[os.DirEntry[str]]:
        opened.append(os.fspath(path))
        return scandir(path)

    def no_walk(*args: object, **kwargs: object) -> None:
        raise AssertionError("a level listing walks no tree")

    monkeypatch.setattr(disk_module.os, "scandir", counting_scandir)
    monkeypatch.setattr(disk_module.os, "walk", no_walk)
    listed = [(item.name, item.is_level) async for item in storage.list_level("top/", limit=10)]
    assert listed == [("d0", True), ("d1", True), ("d2", True), ("f", False)]
    # the level itself, and for each directory listed its way down to the first object
    assert len(opened) == 1 + 3 * 2, opened
    opened.clear()
    assert len([item async for item in storage.list_level("top/", limit=1)]) == 1
    assert len(opened) == 1 + 2, opened


async def test_link_unsupported_falls_back_to_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = DiskStorage(tmp_path)

    def no_link(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    info = await write_blob(storage, b"renamed into place")
    again = await write_blob(storage, b"renamed into place")
    assert again == info
    assert decompress(await read_stored(storage, info.blob_id)) == b"renamed into place"
    assert blob_files(tmp_path) == [info.blob_id]
    assert temporaries(tmp_path) == []


async def test_os_error_is_storage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = DiskStorage(tmp_path)
    await storage.put("key", b"old")

    def broken(fd: int, data: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(disk_module, "_write_all", broken)
    with pytest.raises(StorageError, match="Input/output error") as caught:
        await write_blob(storage, b"x" * 100_000)
    assert not isinstance(caught.value, StorageFull)
    assert str(tmp_path) not in str(caught.value)  # no server paths in the message
    with pytest.raises(StorageError):
        await storage.put("key", b"new")
    assert await storage.get("key") == b"old"
    assert temporaries(tmp_path) == []
    assert blob_files(tmp_path) == []


async def test_fsync_failure_at_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = DiskStorage(tmp_path)
    writer = await asyncio.to_thread(storage.blob_writer)
    await asyncio.to_thread(writer.write, b"data" * 10_000)

    def broken_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(StorageError):
        await asyncio.to_thread(writer.commit)
    monkeypatch.undo()
    await asyncio.to_thread(writer.abort)  # already discarded: a no-op
    assert temporaries(tmp_path) == []
    assert blob_files(tmp_path) == []


async def test_check(tmp_path: Path) -> None:
    storage = DiskStorage(tmp_path / "store")
    await storage.check()
    assert temporaries(tmp_path / "store") == []
    (tmp_path / "store" / "tmp").rmdir()
    with pytest.raises(StorageError):
        await storage.check()


@pytest.mark.parametrize("gone", ["renamed", "wiped"])
async def test_a_store_gone_under_a_running_server_is_unavailable_not_a_miss(
    tmp_path: Path, gone: str
) -> None:
    """The volume unmounted (the store's directory renamed away) or wiped: every read that
    finds nothing says the store cannot be read (503, a backend error), not a miss (404 for
    every cache and entry, which no alert sees); back in place, it is served again."""
    root = tmp_path / "store"
    storage = DiskStorage(root)
    await storage.put("caches/main/entry", b"x")
    info = await write_blob(storage, b"blob")
    missing_blob = blob_id_of(b"never written")

    async def listed(items: AsyncIterator[object]) -> list[object]:
        return [item async for item in items]

    reads: list[Callable[[], Awaitable[object]]] = [
        lambda: storage.get("caches/main/entry"),
        lambda: storage.get("caches/main/other"),
        lambda: storage.exists("caches/main/other"),
        lambda: storage.blob_open(info.blob_id),
        lambda: storage.blob_open(missing_blob),
        lambda: storage.blob_stored_size(missing_blob),
        lambda: listed(storage.keys("caches/")),
        lambda: listed(storage.object_infos("caches/")),
        lambda: listed(storage.list_level("caches/main/", limit=10)),
        lambda: listed(storage.blob_ids()),
        lambda: listed(storage.blob_infos()),
    ]

    # A miss in a store that is there stays a miss.
    assert await storage.get("caches/main/other") is None
    assert await storage.exists("caches/main/other") is False
    assert await storage.blob_open(missing_blob) is None
    assert await storage.blob_stored_size(missing_blob) is None
    assert await listed(storage.keys("caches/none/")) == []
    assert await listed(storage.list_level("caches/none/", limit=10)) == []

    if gone == "renamed":
        root.rename(tmp_path / "elsewhere")
    else:
        for name in ("blobs", "objects", "tmp"):
            shutil.rmtree(root / name)
    for read in reads:
        with pytest.raises(StorageUnavailable, match="missing"):
            await read()

    if gone == "renamed":
        (tmp_path / "elsewhere").rename(root)
        assert await storage.get("caches/main/entry") == b"x"
        reader = await storage.blob_open(info.blob_id)
        assert reader is not None
        await reader.close()
        assert await storage.get("caches/main/other") is None
        assert await listed(storage.keys("caches/")) == ["caches/main/entry"]


def test_open_on_a_file_fails(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StorageError):
        DiskStorage(tmp_path / "file")


# -- a full disk ---------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A 1 MiB filesystem: a real tmpfs when we may mount, else a simulated write budget."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mountpoint)],
            capture_output=True,
            check=False,
        ).returncode
        == 0
    )
    if not mounted:
        budget = [1024 * 1024]
        real_write_all = disk_module._write_all

        def limited(fd: int, data: bytes | memoryview) -> None:
            budget[0] -= len(data)
            if budget[0] < 0:
                budget[0] = 1024 * 1024  # the caller is expected to free what it wrote
                raise OSError(errno.ENOSPC, "No space left on device")
            real_write_all(fd, data)

        monkeypatch.setattr(disk_module, "_write_all", limited)
    try:
        yield mountpoint
    finally:
        if mounted:
            subprocess.run(["umount", str(mountpoint)], check=True)


async def test_full_disk_blob(small_disk: Path) -> None:
    storage = DiskStorage(small_disk)
    data = os.urandom(2 * 1024 * 1024)
    with pytest.raises(StorageFull):
        await write_blob(storage, data)
    assert [blob async for blob in storage.blob_ids()] == []
    assert await storage.blob_open(blob_id_of(data)) is None
    assert temporaries(small_disk) == []
    # the space of the failed temporary was given back
    small = mixed_data(50_000)
    info = await write_blob(storage, small)
    assert decompress(await read_stored(storage, info.blob_id)) == small


async def test_full_disk_objects(small_disk: Path) -> None:
    storage = DiskStorage(small_disk)
    await storage.put("config/value", b"old")
    with pytest.raises(StorageFull):
        await storage.put("config/value", os.urandom(2 * 1024 * 1024))
    assert await storage.get("config/value") == b"old"
    with pytest.raises(StorageFull):
        await storage.put_if_absent("config/other", os.urandom(2 * 1024 * 1024))
    assert await storage.exists("config/other") is False
    assert temporaries(small_disk) == []


# -- crashes -------------------------------------------------------------------------------

CRASHING_WRITER = textwrap.dedent(
    """
    import os, sys, time
    from larder.storage.disk import DiskStorage

    writer = DiskStorage(sys.argv[1]).blob_writer()
    writer.write(os.urandom(3 * 1024 * 1024))
    print("written", flush=True)
    time.sleep(120)  # hold the open writer until the test kills this process
    """
)


async def test_crash_mid_upload_leaves_no_blob(tmp_path: Path) -> None:
    root = tmp_path / "store"
    process = subprocess.Popen(
        [sys.executable, "-c", CRASHING_WRITER, str(root)], stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == b"written\n"
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        if process.stdout is not None:
            process.stdout.close()
    assert process.returncode == -signal.SIGKILL
    leftover = temporaries(root)
    assert len(leftover) == 1 and leftover[0].startswith("blob-")
    assert (root / "tmp" / leftover[0]).stat().st_size > 0

    # a fresh temporary may belong to a live upload: kept
    storage = DiskStorage(root)
    assert [blob async for blob in storage.blob_ids()] == []
    assert temporaries(root) == leftover

    # once old enough, it is removed when the store is opened
    DiskStorage(root, stale_temp_age=0)
    assert temporaries(root) == []
    assert blob_files(root) == []


def test_stale_temporaries_use_age(tmp_path: Path) -> None:
    DiskStorage(tmp_path)
    old, fresh = tmp_path / "tmp" / "blob-old", tmp_path / "tmp" / "blob-fresh"
    old.write_bytes(b"old")
    fresh.write_bytes(b"fresh")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    DiskStorage(tmp_path)
    assert temporaries(tmp_path) == ["blob-fresh"]


async def test_housekeeping_removes_stale_temporaries_and_keeps_a_reserve(tmp_path: Path) -> None:
    """A server restarted at once after a crash never opens the store with the crash's
    temporaries old enough: a collection's housekeeping removes them later."""
    storage = DiskStorage(tmp_path, stale_temp_age=3600)
    assert not await storage.release_reserve()  # no collection yet: no reserve
    crashed = tmp_path / "tmp" / "blob-crashed"
    crashed.write_bytes(b"half an upload")
    await storage.housekeep()
    reserve = tmp_path / "tmp" / "reserve"
    assert crashed.exists() and reserve.stat().st_size == disk_module.RESERVE_SIZE
    two_hours_ago = time.time() - 7200
    for old in (crashed, reserve):
        os.utime(old, (two_hours_ago, two_hours_ago))
    await storage.housekeep()
    assert temporaries(tmp_path) == ["reserve"]  # the reserve is no temporary, however old
    DiskStorage(tmp_path, stale_temp_age=0)
    assert temporaries(tmp_path) == ["reserve"]
    assert await storage.release_reserve() and not reserve.exists()
    assert not await storage.release_reserve()


async def test_housekeeping_on_a_full_disk_goes_without_a_reserve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    storage = DiskStorage(tmp_path)

    def no_space(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(disk_module, "_write_all", no_space)
    await storage.housekeep()
    assert temporaries(tmp_path) == [] and "no space for the" in caplog.text


async def test_a_large_blob_is_handed_to_the_disk_while_it_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ranges: list[tuple[int, int]] = []
    real = disk_module._SYNC_FILE_RANGE
    assert real is not None  # Linux: the call exists

    def recorded(fd: int, offset: int, length: int, flags: int) -> int:
        ranges.append((offset, length))
        return real(fd, offset, length, flags)

    monkeypatch.setattr(disk_module, "_SYNC_FILE_RANGE", recorded)
    storage = DiskStorage(tmp_path)
    data = os.urandom(3 * disk_module.WRITEBACK_STEP + 12345)  # stored about as large
    writer = storage.blob_writer()
    for offset in range(0, len(data), 1 << 20):
        writer.write(data[offset : offset + (1 << 20)])
    info = writer.commit()
    assert len(ranges) >= 2  # zstd hands its output over in pieces of a few MiB
    assert ranges[0][0] == 0
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(ranges))  # contiguous
    assert decompress(await read_stored(storage, info.blob_id)) == data


@pytest.mark.parametrize("code", [errno.EROFS, errno.EIO, errno.EACCES])
async def test_a_volume_that_cannot_be_written_is_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """Remounted read-only after errors, failing, or its permissions taken away: 503 and not
    ready (a replica out of rotation), not a 500 for every write."""
    storage = DiskStorage(tmp_path / "data")
    await storage.put("config/value", b"old")

    def refuse(fd: int, data: bytes | memoryview) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(disk_module, "_write_all", refuse)
    with pytest.raises(StorageUnavailable):
        await storage.put("config/value", b"new")
    assert await storage.get("config/value") == b"old"
    assert temporaries(tmp_path / "data") == []


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


async def test_secrets_are_readable_by_the_servers_user_only(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        storage = DiskStorage(tmp_path)
        assert await storage.put_if_absent(keys.TOKEN_SECRET, b"secret")
        await storage.put(keys.cache_config("main"), b'{"signing_key": "..."}')
        await storage.put("caches/main/narinfo/abc", b"narinfo")
        info = await write_blob(storage, b"blob")
    finally:
        os.umask(old_umask)
    objects = tmp_path / "objects"
    assert mode(objects / "config") == 0o700
    assert mode(objects / keys.TOKEN_SECRET) == 0o600
    assert mode(objects / keys.cache_config("main")) == 0o600
    # What the server serves stays as it was.
    assert mode(objects / "caches/main/narinfo/abc") == 0o644
    assert mode(tmp_path / "blobs" / info.blob_id[:2] / info.blob_id) == 0o644


def test_every_secret_key_is_under_the_private_prefix() -> None:
    for key in (keys.TOKEN_SECRET, keys.cache_config("main"), keys.revoked("id")):
        assert key.startswith(PRIVATE_PREFIX)


async def test_a_store_made_world_readable_is_narrowed_and_rewrites_are_private(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tmp_path / "objects" / "config" / "caches"
    config.mkdir(parents=True)
    for directory in (config, config.parent):
        directory.chmod(0o755)
    (config / "main.json").write_bytes(b"old")
    (config / "main.json").chmod(0o644)
    with caplog.at_level("WARNING", logger=disk_module.__name__):
        storage = DiskStorage(tmp_path)
    assert mode(config.parent) == 0o700
    assert "was readable by other users" in caplog.text
    await storage.put(keys.cache_config("main"), b"new")
    assert mode(config / "main.json") == 0o600
    caplog.clear()
    with caplog.at_level("WARNING", logger=disk_module.__name__):
        DiskStorage(tmp_path)
    assert caplog.text == ""  # narrowed once


async def test_a_chmod_the_file_system_ignores_is_not_reported_as_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Some mounts (CIFS, some FUSE) accept chmod and keep their mode."""
    DiskStorage(tmp_path / "store")
    private = tmp_path / "store" / "objects" / "config"
    private.chmod(0o777)
    monkeypatch.setattr(disk_module.os, "chmod", lambda *args, **kwargs: None)
    DiskStorage(tmp_path / "store")
    assert "could not be narrowed" in caplog.text and "narrowed to" not in caplog.text


@pytest.mark.skipif(os.geteuid() != 0, reason="making files for another user needs root")
@pytest.mark.parametrize("layout", ["owned", "fsgroup"])
async def test_what_root_writes_into_another_users_store_stays_that_users(
    tmp_path: Path, layout: str
) -> None:
    """``sudo larder cache create`` on a store ``larder serve`` runs as uid 10001 from: the
    secrets root writes must stay readable by the server. ``fsgroup``: the volume's top is
    root's (group 10001, setgid, as Kubernetes' fsGroup makes it), the server made the rest."""
    root = tmp_path / "store"
    root.mkdir()
    if layout == "owned":
        os.chown(root, 10001, 10001)
    else:
        os.chown(root, 0, 10001)
        root.chmod(0o2775)
        for name in ("objects", "blobs", "tmp"):
            (root / name).mkdir()
            os.chown(root / name, 10001, 10001)
    storage = DiskStorage(root)
    await storage.put(f"{PRIVATE_PREFIX}caches/second.json", b"{}")
    await storage.put("caches/second/narinfo/abc", b"x")
    info = await write_blob(storage, mixed_data(100_000))
    made = [p for p in root.rglob("*")]
    assert len(made) > 8
    assert {(p.stat().st_uid, p.stat().st_gid) for p in made} == {(10001, 10001)}
    secret = root / "objects" / PRIVATE_PREFIX / "caches" / "second.json"
    assert secret.stat().st_mode & 0o777 == 0o600
    assert await read_stored(storage, info.blob_id)


@pytest.mark.skipif(os.geteuid() != 0, reason="making files for another user needs root")
async def test_a_root_that_may_not_chown_still_uses_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """NFS with root squash, dropped capabilities: root keeps what it makes, with a warning."""
    root = tmp_path / "store"
    root.mkdir()
    os.chown(root, 10001, 10001)

    def refused(*args: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(disk_module.os, "chown", refused)
    monkeypatch.setattr(disk_module.os, "fchown", refused)
    monkeypatch.setattr(disk_module, "_CHOWN_WARNED", False)
    storage = DiskStorage(root)
    await storage.put(f"{PRIVATE_PREFIX}caches/second.json", b"{}")
    assert await storage.get(f"{PRIVATE_PREFIX}caches/second.json") == b"{}"
    assert caplog.text.count("cannot give what this root process creates") == 1


def test_a_permission_error_names_the_file(tmp_path: Path) -> None:
    with (
        pytest.raises(StorageError, match=f"Permission denied: {tmp_path}/x"),
        disk_module._os_errors("get"),
    ):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "x"))


@pytest.mark.parametrize("damage", ["cut", "flipped", "other content"])
async def test_content_committed_again_replaces_a_blob_damaged_at_rest(
    tmp_path: Path, damage: str
) -> None:
    storage = DiskStorage(tmp_path)
    data = mixed_data(300_000, seed=21)
    first = await write_blob(storage, data)
    path = storage._blob_path(first.blob_id)
    stored = path.read_bytes()
    other = await write_blob(storage, mixed_data(300_000, seed=22))
    damaged = {
        "cut": stored[: len(stored) // 2],
        "flipped": stored[:-20] + bytes([stored[-20] ^ 1]) + stored[-19:],
        "other content": storage._blob_path(other.blob_id).read_bytes(),
    }[damage]
    path.write_bytes(damaged)
    again = await write_blob(storage, data)
    assert again.blob_id == first.blob_id
    assert decompress(path.read_bytes()) == data
    assert again.stored_size == path.stat().st_size
    assert again.stored_sha256 == hashlib.sha256(path.read_bytes()).digest()
    assert temporaries(tmp_path) == []


async def test_content_committed_again_keeps_a_sound_blob_and_reports_its_sha256(
    tmp_path: Path,
) -> None:
    storage = DiskStorage(tmp_path)
    data = mixed_data(300_000, seed=23)
    first = await write_blob(storage, data)
    path = storage._blob_path(first.blob_id)
    inode = path.stat().st_ino
    again = await write_blob(storage, data)
    assert path.stat().st_ino == inode
    assert again.stored_sha256 == first.stored_sha256 == hashlib.sha256(path.read_bytes()).digest()


async def test_a_sound_blob_committed_again_is_compared_not_decoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same content in the same encoding is the same bytes: their sha256 says so, without
    decoding the stored blob again (a duplicate upload took 1.4x as long)."""
    storage = DiskStorage(tmp_path)
    data = mixed_data(300_000, seed=24)
    await write_blob(storage, data)
    decoded: list[str] = []
    real = disk_module.check_stored

    def counted(stored: Any, blob_id: str, size: int) -> bytes | None:
        decoded.append(blob_id)
        return real(stored, blob_id, size)

    monkeypatch.setattr(disk_module, "check_stored", counted)
    again = await write_blob(storage, data)
    assert decoded == [] and again.stored_sha256 is not None
