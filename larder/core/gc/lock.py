"""One collection at a time across every replica: a lease in the object store.

The lease is the object ``gc/lock`` (JSON: owner id, host, pid, when it was taken). Taking it is
``put_if_absent``, so of two collectors starting together exactly one wins; while it is held
(:func:`held`) a task rewrites it every ``lease / 3`` seconds, which moves its modification
time, and the holder calls :meth:`Lease.check` before each step that deletes. A lease not rewritten
for ``lease`` seconds belongs to a collector that died: the next one deletes it (only if it is
still that old, :meth:`~larder.storage.base.Storage.delete_if_older`) and takes it. A lease
whose holder ran on the same machine (host, boot and pid namespace) and whose process is gone
(its pid free, or another process's: the start time differs) is taken over at once, as is one
this process left behind when releasing it failed; "at once" is after watching it unchanged
for :data:`SETTLED` seconds. A holder that finds someone else's lease when it renews has lost
it and must stop (:class:`LeaseLost`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from larder.core import keys
from larder.core.blobs import load_record
from larder.errors import LarderError, StorageError, StorageFull
from larder.storage.base import Storage

log = logging.getLogger("larder.gc")

DEFAULT_LEASE = 900.0
#: Seconds a dead holder's lease is watched, unchanged, before it is taken over: S3 keeps whole
#: seconds, so a lease another collector wrote in the same second could not be told from it.
SETTLED = 2.0
#: Owners of the leases this process holds: a lease naming this process with another owner is
#: one it could not release (its storage was down then), free to take over at once.
_HELD: set[str] = set()


class CollectionBusy(LarderError):
    """Another collection holds the lease."""

    code = "gc_busy"


class LeaseLost(LarderError):
    """This collection's lease was taken over (it failed to renew it in time)."""

    code = "gc_lease_lost"


@dataclass
class Lease:
    """A held lease; :meth:`renew` it while working, :meth:`release` it when done."""

    storage: Storage
    owner: str
    document: bytes
    lease: float
    clock: Callable[[], float]
    renewed: float
    lost: LarderError | None = field(default=None)

    async def _holder(self) -> str | None:
        data = await self.storage.get(keys.GC_LOCK)
        if data is None:
            return None
        try:
            return str(load_record(data).get("owner"))
        except StorageError:
            return None

    async def renew(self, force: bool = False) -> None:
        """Rewrite the lease if a third of its term has passed (or ``force``)."""
        now = self.clock()
        if not force and now - self.renewed < self.lease / 3:
            return
        if await self._holder() != self.owner:
            raise LeaseLost("another collection took over this one's lease; stopping")
        await self.storage.put(keys.GC_LOCK, self.document)
        self.renewed = now

    def check(self) -> None:
        """Raise :class:`LeaseLost` (or why renewing failed) unless the lease is still held."""
        if self.lost is not None:
            raise self.lost

    async def keep(self) -> None:
        """Renew every third of the term until cancelled; a failure is kept for :meth:`check`."""
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                await self.renew(force=True)
            except LarderError as exc:
                log.warning("cannot renew the collection lease: %s", exc.message)
                self.lost = exc
                return

    async def release(self) -> None:
        _HELD.discard(self.owner)  # if deleting fails, the next collection here takes it over
        if await self._holder() == self.owner:
            await self.storage.delete(keys.GC_LOCK)


def _process() -> dict[str, str]:
    """What names this process on this machine beyond its pid, which a restarted container
    reuses: the boot, the pid namespace and the process's start time (Linux; else empty)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return {}
    started = _started(os.getpid())
    return {"boot": boot, "pidns": namespace, "started": started} if started else {}


def _started(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else None


def _holder_is_dead(holder: dict[str, object]) -> bool:
    """Whether the lease's holder was a process of this machine, boot and pid namespace that
    is gone (killed, or its pid now another process's), or is this process with a lease it no
    longer holds (:data:`_HELD`); unknown is alive."""
    mine = _process()
    if not mine or holder.get("host") != socket.gethostname():
        return False
    if any(holder.get(name) != mine[name] for name in ("boot", "pidns")):
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool):
        return False
    if pid == os.getpid():
        return holder.get("started") == mine["started"] and holder.get("owner") not in _HELD
    return holder.get("started") is not None and _started(pid) != holder.get("started")


async def _take_from_the_dead(storage: Storage) -> bool:
    """Delete the lease if its holder is dead (:func:`_holder_is_dead`), only if it is still
    the lease that holder wrote; ``True`` if this call deleted it."""
    # Its time first: a lease written after it (another collector that took over the same
    # dead lease) is newer than the cutoff, so it is never the one deleted. S3 keeps whole
    # seconds: the lease is judged again SETTLED seconds (of this machine's time, whatever the
    # store's clock says) after it was first seen, and a collector taking it over meanwhile
    # wrote its own at least that much later, so visibly newer.
    seen: float | None = None
    for _ in range(2):
        written = [i async for i in storage.object_infos(keys.GC_LOCK) if i.key == keys.GC_LOCK]
        data = await storage.get(keys.GC_LOCK)
        if not written or data is None:
            return False
        try:
            holder = load_record(data)
        except StorageError:
            return False
        if not _holder_is_dead(holder):
            return False
        if seen == written[0].modified:
            log.warning(
                "taking over the collection lease of pid %s on this host: the process is gone",
                holder.get("pid"),
            )
            return await storage.delete_if_older(keys.GC_LOCK, written[0].modified + 0.001)
        seen = written[0].modified
        await asyncio.sleep(SETTLED)
    return False


async def store_time(storage: Storage, key: str) -> float | None:
    """The modification time the store gives ``key`` (its own clock: S3's, a file server's),
    or None when it is not there."""
    async for info in storage.object_infos(key):
        if info.key == key:
            return info.modified
    return None


async def store_now(storage: Storage, owner: str, clock: Callable[[], float]) -> float:
    """Now by the store's clock, from an object written for the purpose (``clock()`` when the
    store cannot say): ages of stored objects are judged by the clock that dated them."""
    probe = f"{keys.GC_CLOCK_PREFIX}{owner}"
    try:
        await storage.put(probe, b"")
        stamped = await store_time(storage, probe)
        await storage.delete(probe)
    except StorageError:
        return clock()
    return stamped if stamped is not None else clock()


async def acquire(
    storage: Storage, lease: float = DEFAULT_LEASE, clock: Callable[[], float] = time.time
) -> Lease:
    """Take the lease or raise :class:`CollectionBusy` naming its holder."""
    owner = secrets.token_hex(8)
    document = json.dumps(
        {
            "owner": owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": clock(),
            **_process(),
        }
    ).encode()
    for _ in range(3):
        try:
            taken = await storage.put_if_absent(keys.GC_LOCK, document)
        except StorageFull:  # a full disk is when a collection is needed most
            if not await storage.release_reserve():
                raise
            log.warning("storage full: the reserve was freed for the collection lease")
            taken = await storage.put_if_absent(keys.GC_LOCK, document)
        if taken:
            _HELD.add(owner)
            return Lease(storage, owner, document, lease, clock, clock())
        # The lease is dated by the store's clock: judged by this host's, one running ahead
        # would take a live collection's lease.
        now = min(clock(), await store_now(storage, owner, clock))
        stale = await storage.delete_if_older(keys.GC_LOCK, now - lease)
        if not stale:
            stale = await _take_from_the_dead(storage)
        if not stale and await storage.exists(keys.GC_LOCK):
            break  # held and alive
    held = await storage.get(keys.GC_LOCK)
    try:
        holder = load_record(held) if held is not None else {}
    except StorageError:
        holder = {}
    raise CollectionBusy(
        f"another collection is running (host {holder.get('host', '?')}, "
        f"pid {holder.get('pid', '?')}, since {holder.get('since', '?')})"
    )


@contextlib.asynccontextmanager
async def held(
    storage: Storage, lease: float = DEFAULT_LEASE, clock: Callable[[], float] = time.time
) -> AsyncIterator[Lease]:
    """The lease, renewed in the background while the block runs, released after it."""
    taken = await acquire(storage, lease, clock)
    keeper = asyncio.create_task(taken.keep())
    try:
        yield taken
    except BaseException:
        await _let_go(taken, keeper, failing=True)
        raise
    await _let_go(taken, keeper, failing=False)


async def _let_go(taken: Lease, keeper: asyncio.Task[None], failing: bool) -> None:
    """Stop renewing and release; a release that fails after the collection failed is logged,
    so the collection's own error is the one reported."""
    keeper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await keeper
    try:
        await taken.release()
    except LarderError as exc:
        if not failing:
            raise
        log.warning(
            "collection lease not released (%s): the next collection here takes it over",
            exc.message,
        )
