"""Garbage collection: keeps caches within their limits without ever breaking a closure.

One run (:meth:`Collector.run`):

1. takes the lease (:mod:`larder.core.gc.lock`), so one collection runs at a time across every
   replica; a dry run takes none and changes nothing;
2. writes this process's recorded uses, lists every cache's objects and every blob
   (:mod:`larder.core.gc.graph`), reads recorded uses (:mod:`larder.core.lastuse`) and pins;
3. plans each cache under its own limits, then the whole store under the store's
   (:func:`larder.core.gc.plan.plan`): least recently used first, closures whole, pinned and
   recent closures kept;
4. deletes in waves, referrers before what they refer to. Each delete is conditional on the
   modification time the listing saw, so an object written again meanwhile stays, and then so
   does everything it refers to;
5. restores: narinfos and manifests written since the listing are read, and whatever they refer
   to that this run deleted is put back. Nix checks that a reference exists and only then uploads
   its referrer, so without this an upload racing the run could end up without its closure;
6. reaps blobs that no object refers to (listed again after the deletions) and that were last
   committed ``grace`` or more before the run began;
7. compacts recorded uses, writes its report to ``gc/last-run`` and releases the lease.

Everything written after a run begins is protected by ``grace``. It must exceed the clock skew
between the collector and the storage backend, the time one upload takes from committing its
blob to writing its record, and the time a narinfo upload takes from checking its references to
writing itself (the restore step waits ``settle`` seconds for those before it looks).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field

from larder.core import keys
from larder.core.concurrency import bounded_map
from larder.core.gc.graph import (
    KINDS,
    REFERRING_KINDS,
    Entry,
    Snapshot,
    Tally,
    read_snapshot,
    scan,
    tally,
)
from larder.core.gc.lock import DEFAULT_LEASE, Lease, held, store_time
from larder.core.gc.plan import Node, Policy, plan, total_size
from larder.core.lastuse import RecordedUses, UseRecorder, compact_uses, load_uses
from larder.core.pins import pins
from larder.errors import StorageError, StorageFull
from larder.storage.base import Storage, StoredBlob

log = logging.getLogger("larder.gc")

# Objects a new upload can refer to: kept in memory once deleted, to be put back if one does.
RESTORABLE_KINDS = frozenset(
    {"narinfo", "nar", "nix_file", "rustc_blob", "rustc_inputs", "rustc_crate"}
)
BLOB_KINDS = ("nar", "nix_file", "rustc_blob", "sccache_entry")
MIN_GRACE = 1.0  # S3 reports whole seconds: less could not tell a rewrite from the original
DEFAULT_SETTLE = 2.0
_CONCURRENCY = 32
# Conditional deletes compare with the time the listing saw, plus this much for float rounding.
_SAME_TIME = 1e-3


@dataclass
class CacheReport:
    """One cache's part of a run."""

    max_size: int | None = None
    retention: float | None = None
    size_before: int = 0  # its objects plus the distinct blobs they hold
    size_after: int = 0
    before: dict[str, Tally] = field(default_factory=dict)
    evicted: dict[str, Tally] = field(default_factory=dict)


@dataclass
class Report:
    """What a run found and did (a dry run: what it would do)."""

    dry_run: bool
    started: float
    finished: float = 0.0
    grace: float = 0.0
    caches: dict[str, CacheReport] = field(default_factory=dict)
    store_max_size: int | None = None
    store_size_before: int = 0  # every cache's objects and every listed blob
    store_size_after: int = 0
    evicted_objects: int = 0
    evicted_bytes: int = 0
    kept_rewritten: int = 0  # planned, but written again during the run
    restored: int = 0  # deleted, then put back for an upload that referred to them
    corrupt: int = 0  # objects that did not parse (kept, judged by age alone)
    blobs_reaped: int = 0
    blob_bytes_reaped: int = 0

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    def render(self) -> str:
        """A human-readable summary."""
        verb = "would evict" if self.dry_run else "evicted"
        lines = []
        for name, cache in sorted(self.caches.items()):
            limits = ", ".join(
                part
                for part in (
                    f"max size {cache.max_size:,} B" if cache.max_size is not None else "",
                    f"retention {cache.retention:.0f} s" if cache.retention is not None else "",
                )
                if part
            )
            lines.append(
                f"cache {name}: {cache.size_before:,} -> {cache.size_after:,} bytes"
                + (f" ({limits})" if limits else " (no limits)")
            )
            for kind, before in cache.before.items():
                gone = cache.evicted.get(kind, Tally())
                lines.append(
                    f"  {kind:<15} {before.objects:>8,} objects {before.bytes:>15,} B"
                    f"   {verb} {gone.objects:,} ({gone.bytes:,} B)"
                )
        cap = f" (max size {self.store_max_size:,} B)" if self.store_max_size is not None else ""
        lines.append(
            f"store: {self.store_size_before:,} -> {self.store_size_after:,} bytes{cap}; "
            f"{verb} {self.evicted_objects:,} objects; "
            f"blobs {'to reap' if self.dry_run else 'reaped'} {self.blobs_reaped:,} "
            f"({self.blob_bytes_reaped:,} B); kept as rewritten {self.kept_rewritten}; "
            f"restored {self.restored}; corrupt {self.corrupt}; "
            f"{self.finished - self.started:.1f} s"
        )
        return "\n".join(lines)


@dataclass
class _Work:
    """The state of one run between its steps."""

    caches: list[str]
    snapshot: Snapshot
    nodes: dict[str, Node]
    order: list[str]  # everything planned, referrers first
    uses: dict[str, RecordedUses]
    deleted: set[str] = field(default_factory=set)
    kept: set[str] = field(default_factory=set)
    restored: set[str] = field(default_factory=set)
    trash: dict[str, bytes] = field(default_factory=dict)
    reaped: dict[str, StoredBlob] = field(default_factory=dict)  # still counted in the report


class Collector:
    """Runs collections over one store. ``recorder`` (the service's) is flushed before a run;
    ``forget`` is told each deleted key (the service drops what it remembers of them)."""

    def __init__(
        self,
        storage: Storage,
        *,
        recorder: UseRecorder | None = None,
        forget: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
        settle: float = DEFAULT_SETTLE,
        lease: float = DEFAULT_LEASE,
    ) -> None:
        self._storage = storage
        self._recorder = recorder
        self._forget = forget
        self._clock = clock
        self._settle = settle
        self._lease_term = lease
        self.known: dict[str, Entry] = {}  # the last listing, so the next re-reads only changes
        self.left: Snapshot | None = None  # what the last collection left (objects and blobs)

    async def run(
        self,
        policies: Mapping[str, Policy],
        store: Policy | None = None,
        *,
        caches: Iterable[str],
        grace: float,
        dry_run: bool = False,
    ) -> Report:
        """Collect: ``policies`` names the caches to judge and their limits (a cache not named
        loses nothing to its own limits); ``store`` limits every cache together; ``caches`` are
        all the caches (each is listed: any of them may hold a blob)."""
        if grace < MIN_GRACE:
            raise ValueError(f"grace must be at least {MIN_GRACE} s")
        if dry_run:
            report = Report(dry_run=True, started=self._clock(), grace=grace)
            work = await self._plan(list(caches), policies, store, grace, report)
            self._count_reapable(work, grace, report)
            await asyncio.to_thread(self._finish, work, report)
            return report
        async with held(self._storage, self._lease_term, self._clock) as lease:
            if self._recorder is not None:
                try:
                    await self._recorder.flush()
                except StorageFull as exc:  # the uses are still read from memory: _plan
                    log.warning("uses not written before collecting: %s", exc.message)
            # Ages are judged by the store's clock (it dated every object; the lease was written
            # just now): a collector whose clock runs ahead would take what was just uploaded.
            stamped = await store_time(self._storage, keys.GC_LOCK)
            started = self._clock() if stamped is None else min(self._clock(), stamped)
            report = Report(dry_run=False, started=started, grace=grace)
            work = await self._plan(list(caches), policies, store, grace, report)
            await self._evict(work, lease)
            lease.check()
            await self._restore(work)
            lease.check()
            await self._reap(work, grace, report)
            await self._compact(work)
            # Grouping and counting every object: about a second for 300,000, off the loop.
            await asyncio.to_thread(self._finish, work, report)
            await self._storage.put(keys.GC_LAST_RUN, report.to_json())
            try:
                await self._storage.housekeep()
            except StorageError as exc:
                log.warning("storage housekeeping after the collection failed: %s", exc.message)
            return report

    # -- planning ----------------------------------------------------------------------------

    async def _plan(
        self,
        caches: list[str],
        policies: Mapping[str, Policy],
        store: Policy | None,
        grace: float,
        report: Report,
    ) -> _Work:
        snapshot = await read_snapshot(self._storage, caches, self.known, clock=report.started)
        self.known = snapshot.entries
        uses: dict[str, RecordedUses] = {}
        pinned: dict[str, set[str]] = {}
        for cache in caches:
            uses[cache] = await load_uses(self._storage, cache)
            pinned[cache] = {
                keys.narinfo(cache, pin.store_hash) for pin in await pins(self._storage, cache)
            }
        # What a failed flush left in memory (nothing after one that worked)
        pending = self._recorder.pending_by_cache() if self._recorder is not None else {}
        # Millions of objects take seconds to weigh: off the event loop, which keeps serving
        # (and beating a worker's heartbeat) meanwhile.
        nodes, order = await asyncio.to_thread(
            _weigh, caches, snapshot, uses, pending, pinned, policies, store, grace, report
        )
        return _Work(caches, snapshot, nodes, order, uses)

    # -- deleting ----------------------------------------------------------------------------

    async def _evict(self, work: _Work, lease: Lease) -> None:
        referrers, waves = await asyncio.to_thread(_waves, work)

        async def evict(key: str) -> None:
            entry = work.snapshot.entries[key]
            if referrers[key] & work.kept:
                work.kept.add(key)  # a referrer stayed, so this stays with it
                return
            data = None
            if entry.kind in RESTORABLE_KINDS:
                data = await self._storage.get(key)
                if data is None:
                    return  # deleted by someone else since the listing
            if await self._storage.delete_if_older(key, entry.modified + _SAME_TIME):
                work.deleted.add(key)
                if data is not None:
                    work.trash[key] = data
                if self._forget is not None:
                    self._forget(key)
            elif await self._storage.exists(key):
                work.kept.add(key)

        for depth in sorted(waves):
            lease.check()
            await bounded_map(evict, waves[depth], _CONCURRENCY)

    async def _restore(self, work: _Work) -> None:
        """Put back what this run deleted that an object written since the listing needs."""
        if not work.trash:
            return
        await asyncio.sleep(self._settle)
        touched = {split[0] for key in work.deleted if (split := keys.cache_of(key))}
        wanted: list[str] = []
        # Against this run's own listing: ``known`` may have been replaced meanwhile (a usage
        # scan), and an upload it saw would then look as old as the listing.
        listed = work.snapshot.entries
        for cache in sorted(touched):
            async for key, entry in scan(self._storage, cache, REFERRING_KINDS, listed):
                if entry is not listed.get(key):  # new or written again since the listing
                    wanted += [ref for ref in entry.refs if ref in work.trash]
        back: set[str] = set()
        while wanted:
            key = wanted.pop()
            if key in back or key not in work.trash:
                continue
            back.add(key)
            wanted += work.snapshot.entries[key].refs
        # What is referred to goes back before what refers to it.
        position = {key: index for index, key in enumerate(work.order)}
        for key in sorted(back, key=lambda k: position.get(k, 0), reverse=True):
            await self._storage.put_if_absent(key, work.trash[key])
            work.deleted.discard(key)
            log.info("restored %s: an upload during the collection refers to it", key)
        work.restored = back

    async def _reap(self, work: _Work, grace: float, report: Report) -> None:
        """Delete blobs nothing refers to now that were committed ``grace`` before the run."""
        held: set[str] = set()
        for cache in work.caches:
            async for _, entry in scan(self._storage, cache, BLOB_KINDS, self.known):
                if entry.blob is not None:
                    held.add(entry.blob)
        candidates = self._loose_blobs(work, grace, held)

        async def reap(blob_id: str) -> int:
            blob = work.snapshot.blobs[blob_id]
            if await self._storage.blob_delete_if_older(blob_id, blob.modified + _SAME_TIME):
                return blob.stored_size
            return -1

        freed = await bounded_map(reap, candidates, _CONCURRENCY)
        report.blobs_reaped = sum(1 for size in freed if size >= 0)
        report.blob_bytes_reaped = sum(size for size in freed if size > 0)
        for blob_id, size in zip(candidates, freed, strict=True):
            if size >= 0:
                work.reaped[blob_id] = work.snapshot.blobs.pop(blob_id)

    def _loose_blobs(self, work: _Work, grace: float, held: set[str]) -> list[str]:
        cutoff = work.snapshot.started - grace
        return [
            blob.blob_id
            for blob in work.snapshot.blobs.values()
            if blob.blob_id not in held and blob.modified < cutoff
        ]

    def _count_reapable(self, work: _Work, grace: float, report: Report) -> None:
        planned = set(work.order)
        held = {e.blob for k, e in work.snapshot.entries.items() if e.blob and k not in planned}
        loose = self._loose_blobs(work, grace, held)
        report.blobs_reaped = len(loose)
        report.blob_bytes_reaped = sum(work.snapshot.blobs[b].stored_size for b in loose)

    async def _compact(self, work: _Work) -> None:
        for cache, read in work.uses.items():
            prefix = keys.cache_prefix(cache)
            keep = {}
            for rel, when in read.times.items():
                entry = work.snapshot.entries.get(prefix + rel)
                if entry is not None and prefix + rel not in work.deleted and when > entry.modified:
                    keep[rel] = when
            await compact_uses(self._storage, cache, keep, read)

    # -- reporting ---------------------------------------------------------------------------

    def _finish(self, work: _Work, report: Report) -> None:
        gone = set(work.order) if report.dry_run else work.deleted
        entries = work.snapshot.entries
        blob_sizes = {blob_id: blob.stored_size for blob_id, blob in work.snapshot.blobs.items()}
        grouped = work.snapshot.by_cache()
        for cache, cache_report in report.caches.items():
            held = grouped.get(cache, {})
            evicted = [entry for key, entry in held.items() if key in gone]
            # An evicted entry's blob counts with it whether it was reaped or is still held
            # by another entry, as in a dry run.
            cache_report.evicted = tally(evicted, {**work.snapshot.blobs, **work.reaped}, KINDS)
            left = [entry for key, entry in held.items() if key not in gone]
            cache_report.size_after = total_size(left, blob_sizes)
        report.evicted_objects = len(gone)
        report.evicted_bytes = sum(entries[k].size for k in gone)
        report.kept_rewritten = len(work.kept)
        report.restored = len(work.restored)
        survivors = [e for k, e in entries.items() if k not in gone]
        loose = report.blob_bytes_reaped if report.dry_run else 0
        report.store_size_after = sum(e.size for e in survivors) + sum(blob_sizes.values()) - loose
        if not report.dry_run:
            self.known = {k: e for k, e in entries.items() if k not in gone}
            self.left = Snapshot(work.snapshot.started, self.known, work.snapshot.blobs)
        report.finished = self._clock()


def _waves(work: _Work) -> tuple[dict[str, set[str]], dict[int, list[str]]]:
    """Each planned object's planned referrers, and the planned objects by wave: an object
    goes in the wave after the last of its referrers' (so referrers are deleted first)."""
    planned = set(work.order)
    referrers: dict[str, set[str]] = defaultdict(set)
    for key in work.order:
        for ref in work.nodes[key].refs:
            if ref in planned and ref != key:
                referrers[ref].add(key)
    level: dict[str, int] = {}
    for key in work.order:  # referrers come first, so theirs are known
        level[key] = 1 + max((level[r] for r in referrers[key]), default=-1)
    waves: dict[int, list[str]] = defaultdict(list)
    for key in work.order:
        waves[level[key]].append(key)
    return referrers, waves


def _with_grace(policy: Policy, grace: float) -> Policy:
    return Policy(policy.max_size, policy.retention, grace)


def _weigh(
    caches: list[str],
    snapshot: Snapshot,
    uses: Mapping[str, RecordedUses],
    pending: Mapping[str, Mapping[str, float]],
    pinned: Mapping[str, set[str]],
    policies: Mapping[str, Policy],
    store: Policy | None,
    grace: float,
    report: Report,
) -> tuple[dict[str, Node], list[str]]:
    """The collection's nodes (every object with its last use) and what to evict, in order;
    fills ``report``'s sizes and tallies. Pure: no storage."""
    blob_sizes = {blob_id: blob.stored_size for blob_id, blob in snapshot.blobs.items()}
    grouped = snapshot.by_cache()
    nodes: dict[str, Node] = {}
    scopes: dict[str, dict[str, Node]] = {}
    for cache in caches:
        times = uses[cache].times
        for rel, when in pending.get(cache, {}).items():
            times[rel] = max(when, times.get(rel, -math.inf))
        cut = len(keys.cache_prefix(cache))
        scope = scopes[cache] = {}
        for key, entry in grouped.get(cache, {}).items():
            used = max(entry.modified, times.get(key[cut:], -math.inf))
            scope[key] = nodes[key] = Node(
                key, entry.kind, used, entry.size, entry.refs, entry.blob, key in pinned[cache]
            )
    report.corrupt = sum(1 for entry in snapshot.entries.values() if entry.corrupt)
    order: list[str] = []
    for cache in caches:
        policy = policies.get(cache)
        scope = scopes[cache]
        cache_report = CacheReport(
            max_size=policy.max_size if policy else None,
            retention=policy.retention if policy else None,
            size_before=total_size(scope.values(), blob_sizes),
            before=tally((snapshot.entries[k] for k in scope), snapshot.blobs, KINDS),
        )
        report.caches[cache] = cache_report
        if policy is not None and policy.limited:
            order += plan(scope, blob_sizes, _with_grace(policy, grace), report.started).evict
    report.store_size_before = sum(n.size for n in nodes.values()) + sum(blob_sizes.values())
    if store is not None and store.limited:
        report.store_max_size = store.max_size
        gone = set(order)
        rest = {key: node for key, node in nodes.items() if key not in gone}
        capped = _with_grace(store, grace)
        if capped.max_size is not None:
            # Blobs nothing holds that are too young to reap stay: they use up the budget.
            held = {node.blob for node in nodes.values() if node.blob is not None}
            young = sum(
                blob.stored_size
                for blob_id, blob in snapshot.blobs.items()
                if blob_id not in held and blob.modified >= report.started - grace
            )
            capped = Policy(max(0, capped.max_size - young), capped.retention, grace)
        order += plan(rest, blob_sizes, capped, report.started).evict
    return nodes, order
