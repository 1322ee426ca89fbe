"""What the worker processes of one ``larder serve`` share (``workers`` > 1).

The supervisor creates one directory per server and gives every worker its index and the path:

* ``metrics/``: prometheus-client's multiprocess files (``PROMETHEUS_MULTIPROC_DIR``), so any
  worker's ``GET /metrics`` shows the sums over all workers;
* ``narinfo-writes``: one 8-byte counter per worker, bumped by the worker that stores a narinfo.
  A worker that remembered a served narinfo miss drops it once any counter moved, so a path
  uploaded through one worker is never answered 404 by another (positive entries are bounded by
  ``refresh_interval``, as between replicas);

Hit statistics (``/api/v1/caches/<cache>/stats``) stay per process: with several workers they
count what the answering worker served, and say so in their ``scope``.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path

COUNTER_SIZE = 8


@dataclass(frozen=True)
class Worker:
    """One worker process: its index among ``count`` and the server's shared directory."""

    index: int
    count: int
    directory: Path

    @property
    def metrics_dir(self) -> Path:
        return self.directory / "metrics"

    @property
    def writes_path(self) -> Path:
        return self.directory / "narinfo-writes"


def prepare(directory: Path, count: int) -> None:
    """Lay out a new shared directory for ``count`` workers (the supervisor does this once)."""
    (directory / "metrics").mkdir(parents=True, exist_ok=True)
    (directory / "narinfo-writes").write_bytes(bytes(COUNTER_SIZE * count))


class SharedWriteCounter:
    """The narinfo write counters of all workers; this worker bumps only its own slot.

    ``value()`` is a snapshot of every slot: it changes whenever any worker stored a narinfo.
    """

    def __init__(self, worker: Worker) -> None:
        fd = os.open(worker.writes_path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self._map = mmap.mmap(fd, COUNTER_SIZE * worker.count)
        finally:
            os.close(fd)
        self._slot = slice(COUNTER_SIZE * worker.index, COUNTER_SIZE * (worker.index + 1))
        self._count = 0

    def value(self) -> object:
        return self._map[:]

    def bump(self) -> None:
        self._count += 1
        self._map[self._slot] = self._count.to_bytes(COUNTER_SIZE, "little")
