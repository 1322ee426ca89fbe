"""When cached objects were last used: recorded in memory, written in batches, compacted by GC.

A read that serves something (a narinfo, a NAR, a manifest, a blob, an sccache entry) calls
:meth:`UseRecorder.touch` with the object's storage key: a dictionary assignment, no I/O. Checks
an upload makes (does the NAR it names exist?) record nothing: the new object's own write time
dates what it refers to, through its closure. Every
``flush`` (the service runs one every ``use_flush_interval`` seconds and one at shutdown) writes
what was gathered as one new object per cache::

    gc/use/<cache>/<milliseconds>-<writer>   {"<key below caches/<cache>/>": <POSIX seconds>, ...}

so recording costs one storage write per cache per interval, whatever the traffic. Writes are
use too, but they need no record: an object's modification time is its last write.

The collector reads a cache's compacted index ``gc/use-index/<cache>`` and every batch
(:func:`load_uses`), and after a run writes the merged index back and deletes exactly the batches
it read (:func:`compact_uses`); batches other replicas write meanwhile wait for the next run.
Merging keeps the latest time per key, so a batch read twice changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from larder.core import keys
from larder.core.concurrency import bounded_map
from larder.errors import StorageError
from larder.storage.base import Storage

log = logging.getLogger("larder.gc")

# Distinct keys a replica keeps between flushes; more are dropped (and counted) until a flush.
MAX_PENDING = 500_000
_DELETE_CONCURRENCY = 16


Touch = Callable[[str], None]
"""What the protocol modules call with a storage key when a read finds it."""


def ignore_use(key: str) -> None:
    """A :data:`Touch` that records nothing (tools, tests)."""


class UseRecorder:
    """Gathers uses in memory and writes them as batches. Safe to call from the event loop."""

    def __init__(
        self,
        storage: Storage,
        clock: Callable[[], float] = time.time,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self._storage = storage
        self._clock = clock
        self._max = max_pending
        self._pending: dict[str, float] = {}
        self._writer = secrets.token_hex(4)
        self._lock = asyncio.Lock()
        self.dropped = 0  # touches lost because the pending set was full

    def touch(self, key: str) -> None:
        """``key`` (a storage key below ``caches/<cache>/``) was used now."""
        if len(self._pending) >= self._max and key not in self._pending:
            self.dropped += 1
            return
        self._pending[key] = self._clock()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def pending_by_cache(self) -> dict[str, dict[str, float]]:
        """The uses gathered and not written yet: cache -> key below its prefix -> POSIX time
        (what a collection adds to the recorded ones when a write failed)."""
        return _by_cache(self._pending)

    async def flush(self) -> int:
        """Write what was gathered; the number of keys written. On a storage error the uses are
        kept for the next flush and the error is raised."""
        async with self._lock:
            taken, self._pending = self._pending, {}
            batches = {
                cache: {rel: math.ceil(when) for rel, when in uses.items()}
                for cache, uses in _by_cache(taken).items()
            }
            stamp = int(self._clock() * 1000)
            written: list[str] = []
            try:
                for cache, uses in batches.items():
                    name = f"{keys.use_batch_prefix(cache)}{stamp}-{self._writer}"
                    await self._storage.put(name, json.dumps(uses, separators=(",", ":")).encode())
                    written.append(cache)
            except StorageError:
                for key, when in taken.items():  # put back what was not written
                    split = keys.cache_of(key)
                    if split is not None and split[0] not in written:
                        self._pending[key] = max(when, self._pending.get(key, 0.0))
                raise
            return sum(len(batches[cache]) for cache in written)


def _by_cache(uses: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """Uses by storage key, grouped: cache -> key below the cache's prefix -> time."""
    grouped: dict[str, dict[str, float]] = {}
    for key, when in uses.items():
        split = keys.cache_of(key)
        if split is not None:
            grouped.setdefault(split[0], {})[split[1]] = when
    return grouped


@dataclass
class RecordedUses:
    """A cache's recorded uses: key below the cache's prefix -> POSIX time, and what was read."""

    times: dict[str, float]
    batches: list[str]  # the batch objects merged into ``times``


#: Seconds a batch's writer's clock may differ from the store's before its times are moved to
#: the store's (a batch is written up to a few seconds after its name is stamped; S3 dates to
#: the second).
SKEW_TOLERANCE = 5.0


def _merge(into: dict[str, float], data: bytes, source: str, shift: float = 0.0) -> None:
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        for rel, when in doc.items():
            value = float(when) + shift
            if value > into.get(rel, -math.inf):
                into[rel] = value
    except (ValueError, TypeError) as exc:
        log.warning("ignoring corrupt use record %s: %s", source, exc)


def _writer_skew(key: str, stored: float) -> float:
    """How far the store's clock (``stored``: when it dated batch ``key``) runs ahead of the
    clock of the replica that wrote it (its name's milliseconds), beyond :data:`SKEW_TOLERANCE`;
    0 within it or for a name that says nothing."""
    try:
        written = int(key.rsplit("/", 1)[-1].split("-", 1)[0]) / 1000
    except ValueError:
        return 0.0
    skew = stored - written
    return skew if abs(skew) > SKEW_TOLERANCE else 0.0


async def load_uses(storage: Storage, cache: str) -> RecordedUses:
    """The cache's index merged with every batch present now, each batch's times moved to the
    store's clock: a replica whose clock runs behind would otherwise record reads as older than
    they were, and a collection take what is in use."""
    times: dict[str, float] = {}
    index = await storage.get(keys.use_index(cache))
    if index is not None:
        _merge(times, index, keys.use_index(cache))
    infos = [info async for info in storage.object_infos(keys.use_batch_prefix(cache))]
    for info in infos:
        data = await storage.get(info.key)
        if data is None:
            continue
        shift = _writer_skew(info.key, info.modified)
        if shift:
            log.warning("use record %s: its writer's clock is %+.0f s off the store's", info.key,
                        -shift)  # fmt: skip
        _merge(times, data, info.key, shift)
    return RecordedUses(times, [info.key for info in infos])


async def compact_uses(
    storage: Storage, cache: str, keep: Mapping[str, float], read: RecordedUses
) -> None:
    """Replace the cache's index with ``keep`` and delete the batches ``read`` merged.

    ``keep`` should hold only uses still worth remembering (keys that exist, used after their
    last write); the index is written before any batch goes, so a crash loses nothing.
    """
    document = json.dumps({rel: math.ceil(t) for rel, t in keep.items()}, separators=(",", ":"))
    await storage.put(keys.use_index(cache), document.encode())
    await bounded_map(storage.delete, read.batches, _DELETE_CONCURRENCY)
