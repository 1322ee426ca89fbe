"""What the worker processes of one ``larder serve`` share (``workers`` > 1).

The parent (:mod:`larder.service.server`) creates one directory per server; every worker gets
its index and the path in its environment (:func:`larder.service.config.worker_seat`):

* ``metrics/``: prometheus-client's multiprocess files (``PROMETHEUS_MULTIPROC_DIR``), so any
  worker's ``GET /metrics`` shows the sums over all workers;
* ``narinfo-writes``: for each bucket of store hashes
  (:data:`~larder.core.servedcache.WRITE_BUCKETS`), one 8-byte counter per worker, bumped by the
  worker that stores a narinfo of that bucket. A worker drops a served narinfo it remembers (hit
  or miss) once any counter of its bucket moved, so a path uploaded through one worker is never
  answered 404 by another, nor a narinfo stored again answered in its old form;
* ``heartbeats``: one 8-byte slot per worker, ``CLOCK_MONOTONIC`` nanoseconds written by that
  worker's event loop every :func:`heartbeat_interval`; 0 until the worker has started serving.
  The parent kills a worker whose slot is older than ``worker_timeout``.

Hit statistics (``/api/v1/caches/<cache>/stats``) stay per process: with several workers they
count what the answering worker served, and say so in their ``scope``.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from larder.core.servedcache import WRITE_BUCKETS

SLOT_SIZE = 8
WRITES = "narinfo-writes"
HEARTBEATS = "heartbeats"
METRICS = "metrics"


def heartbeat_interval(worker_timeout: float) -> float:
    """Seconds between a worker's heartbeats: several within ``worker_timeout``, at most 1."""
    return min(1.0, worker_timeout / 4)


#: What a shared directory's name starts with; the parent's pid and a dash follow.
PREFIX = "larder-workers-"
#: The file in a shared directory its parent holds an exclusive ``flock`` on while it runs.
LOCK = "lock"


def make_directory() -> tuple[Path, int]:
    """A new shared directory under the system's temporary directory, and the descriptor of its
    lock, held (``flock``) until the caller closes it or exits. First the directories whose
    lock nobody holds are removed: a parent killed with SIGKILL leaves its own behind, and a
    container's ``/tmp`` outlives its restarts (where the new parent has the old one's pid).
    The directory is locked under another name, then renamed: no scan sees it unlocked."""
    parent = Path(tempfile.gettempdir())
    remove_left_behind(parent)
    making = Path(tempfile.mkdtemp(prefix=f".{PREFIX}", dir=parent))
    fd = os.open(making / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    # No flock on this filesystem (NFS without lockd): serve unlocked; a scan there cannot
    # lock it either, and leaves it alone.
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_EX)
    path = parent / f"{PREFIX}{os.getpid()}-{making.name.removeprefix('.' + PREFIX)}"
    making.rename(path)
    return path, fd


def remove_left_behind(parent: Path) -> list[Path]:
    """Remove this user's shared directories in ``parent`` whose lock nobody holds (their
    parent is gone, in whatever pid namespace it ran), and those without a lock (made by larder
    before it locked them) whose heartbeats nobody wrote for :data:`UNLOCKED_STALE` seconds;
    the ones removed."""
    removed = []
    for path in parent.glob(f"{PREFIX}*"):
        try:
            info = path.lstat()
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                continue
            fd = os.open(path / LOCK, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            if _untouched(path, UNLOCKED_STALE):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
            continue
        except OSError:
            continue  # not ours to look into
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # held: a live server's
        finally:
            os.close(fd)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


#: Seconds without a write after which a shared directory without a lock is a leftover (a
#: live server's workers write their heartbeats every second).
UNLOCKED_STALE = 86400.0


def _untouched(path: Path, seconds: float) -> bool:
    """Whether neither ``path`` nor its heartbeats file changed in the last ``seconds``."""
    try:
        times = [path.lstat().st_mtime]
        with contextlib.suppress(FileNotFoundError):
            times.append((path / HEARTBEATS).stat().st_mtime)
    except OSError:
        return False
    return time.time() - max(times) > seconds


def prepare(directory: Path, count: int) -> None:
    """Lay out a new shared directory for ``count`` workers (the parent does this once)."""
    (directory / METRICS).mkdir(parents=True, exist_ok=True)
    (directory / WRITES).write_bytes(bytes(SLOT_SIZE * count * WRITE_BUCKETS))
    (directory / HEARTBEATS).write_bytes(bytes(SLOT_SIZE * count))


class Slots:
    """A file of 8-byte little-endian slots, one per worker, mapped shared."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size == 0 or size % SLOT_SIZE:
                raise ValueError(f"{path} is not a file of {SLOT_SIZE}-byte slots")
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.count = size // SLOT_SIZE

    def get(self, index: int) -> int:
        return int.from_bytes(self._map[SLOT_SIZE * index : SLOT_SIZE * (index + 1)], "little")

    def set(self, index: int, value: int) -> None:
        self._map[SLOT_SIZE * index : SLOT_SIZE * (index + 1)] = value.to_bytes(SLOT_SIZE, "little")

    def span(self, start: int, count: int) -> bytes:
        """The bytes of ``count`` slots from slot ``start`` on."""
        return self._map[SLOT_SIZE * start : SLOT_SIZE * (start + count)]


@dataclass(frozen=True)
class Worker:
    """One worker process: its index and the server's shared directory."""

    index: int
    directory: Path

    @property
    def metrics_dir(self) -> Path:
        return self.directory / METRICS


class SharedWriteCounter:
    """The narinfo write counters of all workers, bucket by bucket; this worker bumps only its
    own slot of each bucket.

    ``value(bucket)`` is a snapshot of the bucket's slots: it changes whenever any worker stored
    a narinfo of that bucket. A worker started again in the same seat counts on from its slots'
    values, so a snapshot never comes back.
    """

    def __init__(self, worker: Worker) -> None:
        self._slots = Slots(worker.directory / WRITES)
        self._workers = self._slots.count // WRITE_BUCKETS
        if self._workers * WRITE_BUCKETS != self._slots.count or worker.index >= self._workers:
            raise ValueError(f"{worker.directory / WRITES} was not laid out for this worker")
        self._index = worker.index

    def value(self, bucket: int) -> object:
        return self._slots.span(bucket * self._workers, self._workers)

    def bump(self, bucket: int) -> None:
        slot = bucket * self._workers + self._index
        self._slots.set(slot, self._slots.get(slot) + 1)


class Heartbeats:
    """The workers' heartbeat slots: each worker beats its own, the parent reads their ages."""

    def __init__(self, directory: Path) -> None:
        self._slots = Slots(directory / HEARTBEATS)

    def beat(self, index: int) -> None:
        self._slots.set(index, time.monotonic_ns())

    def clear(self, index: int) -> None:
        """A new worker takes slot ``index``: no heartbeat yet."""
        self._slots.set(index, 0)

    def age(self, index: int) -> float | None:
        """Seconds since worker ``index`` last beat; ``None`` if it has not yet."""
        last = self._slots.get(index)
        return None if last == 0 else (time.monotonic_ns() - last) / 1e9
