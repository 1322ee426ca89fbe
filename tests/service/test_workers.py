"""The files the worker processes of one server share: write counters and heartbeats."""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
import time
from pathlib import Path

import pytest

from larder.core.servedcache import WRITE_BUCKETS
from larder.service import workers as shared
from larder.service.workers import (
    Heartbeats,
    SharedWriteCounter,
    Slots,
    Worker,
    heartbeat_interval,
    prepare,
)


def test_a_narinfo_write_in_one_worker_changes_what_every_worker_sees(tmp_path: Path) -> None:
    prepare(tmp_path, 3)
    first, second = SharedWriteCounter(Worker(0, tmp_path)), SharedWriteCounter(Worker(2, tmp_path))
    bucket, other_bucket = 7, WRITE_BUCKETS - 1
    seen, other_seen = second.value(bucket), second.value(other_bucket)
    assert first.value(bucket) == seen
    first.bump(bucket)
    assert second.value(bucket) != seen
    assert second.value(other_bucket) == other_seen  # a write moves its own bucket only
    moved = second.value(bucket)
    second.bump(bucket)
    assert first.value(bucket) != moved
    second.bump(other_bucket)
    assert first.value(other_bucket) != other_seen
    assert Slots(tmp_path / "narinfo-writes").count == 3 * WRITE_BUCKETS


def test_a_worker_restarted_in_a_seat_never_repeats_a_snapshot(tmp_path: Path) -> None:
    prepare(tmp_path, 2)
    other = SharedWriteCounter(Worker(1, tmp_path))
    SharedWriteCounter(Worker(0, tmp_path)).bump(5)
    remembered = other.value(5)  # another worker remembers a narinfo as of this snapshot
    SharedWriteCounter(Worker(0, tmp_path)).bump(5)  # the same seat, started again, stores one
    assert other.value(5) != remembered


def test_a_seat_past_the_layout_is_refused(tmp_path: Path) -> None:
    prepare(tmp_path, 2)
    with pytest.raises(ValueError, match="not laid out"):
        SharedWriteCounter(Worker(2, tmp_path))


def test_heartbeats_age_from_each_workers_own_beat(tmp_path: Path) -> None:
    prepare(tmp_path, 2)
    parent, worker = Heartbeats(tmp_path), Heartbeats(tmp_path)
    assert parent.age(0) is None and parent.age(1) is None  # not started serving yet
    worker.beat(1)
    time.sleep(0.05)
    age = parent.age(1)
    assert age is not None and 0.05 <= age < 5
    assert parent.age(0) is None
    parent.clear(1)  # a new worker in the seat
    assert parent.age(1) is None


def test_a_file_that_is_not_slots_is_refused(tmp_path: Path) -> None:
    (tmp_path / "heartbeats").write_bytes(b"123")
    with pytest.raises(ValueError, match="8-byte slots"):
        Heartbeats(tmp_path)


def test_workers_beat_several_times_within_the_timeout() -> None:
    assert heartbeat_interval(30.0) == 1.0
    assert heartbeat_interval(2.0) == 0.5


def test_shared_directories_whose_lock_nobody_holds_are_removed(tmp_path: Path) -> None:
    """A parent killed with SIGKILL leaves its directory; the next server's start removes it,
    never a live server's, whatever its pid (another pid namespace, pid 1 in containers)."""

    def made(name: str, locked: bool | None) -> tuple[Path, int | None]:
        directory = tmp_path / f"{shared.PREFIX}{name}"
        (directory / "metrics").mkdir(parents=True)
        fd = None
        if locked is not None:
            fd = os.open(directory / shared.LOCK, os.O_RDWR | os.O_CREAT)
            if locked:
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                os.close(fd)
                fd = None
        return directory, fd

    gone, _ = made("1-abc", locked=False)
    live, held = made(f"{os.getpid()}-def", locked=True)  # this process holds it
    same_pid_gone, _ = made(f"{os.getpid()}-ghi", locked=False)
    older_live, _ = made("9-mno", locked=None)  # no lock file: an older larder's
    older_gone, _ = made("10-pqr", locked=None)
    oldest_gone, _ = made("abc123xy", locked=None)  # named before the pid was in the name
    for directory in (older_gone, oldest_gone):  # no heartbeat for two days
        (directory / shared.HEARTBEATS).write_bytes(bytes(8))
        for written in (directory / shared.HEARTBEATS, directory):
            os.utime(written, (time.time() - 2 * 86400,) * 2)
    try:
        removed = shared.remove_left_behind(tmp_path)
    finally:
        assert held is not None
        os.close(held)
    assert sorted(removed) == sorted([gone, same_pid_gone, older_gone, oldest_gone])
    assert live.exists() and older_live.exists()


def test_a_new_shared_directory_is_locked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    directory, fd = shared.make_directory()
    try:
        assert directory.name.startswith(f"{shared.PREFIX}{os.getpid()}-")
        assert shared.remove_left_behind(tmp_path) == []
    finally:
        os.close(fd)
    assert shared.remove_left_behind(tmp_path) == [directory]


def test_a_filesystem_without_flock_still_gets_a_shared_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NFS without lockd: the server started before directories were locked, and must still."""

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(shared.fcntl, "flock", no_locks)
    directory, fd = shared.make_directory()
    os.close(fd)
    assert directory.is_dir() and shared.remove_left_behind(tmp_path) == []
