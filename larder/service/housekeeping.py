"""A serving replica's background work: storage gauges, recorded uses, periodic collection.

* Every ``usage_interval`` seconds the replica lists every cache (re-reading only objects that
  changed since the last listing) and sets ``larder_storage_objects`` / ``_size_bytes``.
* Every ``use_flush_interval`` seconds it writes the uses it recorded (and once at shutdown).
* Every ``gc_interval`` seconds it runs a collection under the configured limits, unless another
  replica completed one within the interval (``gc/last-run``) or holds the lease right now.
  ``larder_gc_last_completed_timestamp_seconds`` is the store's last completed run as this
  replica knows it: read from ``gc/last-run`` at start, every :data:`LAST_RUN_READS` refresh
  intervals (whatever ``gc_interval`` is: with 0, a scheduled ``larder gc`` collects) and
  before each due run, then its own. A replica that restarted, that another replica's runs
  keep idle, or that leaves collections to a scheduled job so still shows how long the store
  has gone without a collection. At the same pace it creates the series of caches made since it
  started (a cache's series exist from 0, :mod:`larder.service.observability.metrics`).

Limits (:func:`gc_policies`): a cache's own (``larder cache limits``) win; a cache without a
retention of its own gets ``gc_retention``; ``gc_max_size`` caps the whole store.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web

from larder.core.caches import CacheSettings
from larder.core.gc.collector import Report
from larder.core.gc.graph import Snapshot, Tally, read_snapshot, tally
from larder.core.gc.lock import CollectionBusy
from larder.core.gc.plan import Policy
from larder.core.keys import GC_LAST_RUN
from larder.errors import LarderError
from larder.service import state
from larder.service.config import Config
from larder.service.observability.metrics import Metrics
from larder.service.state import METRICS

log = logging.getLogger("larder")

#: ``gc/last-run`` is read again every this many ``refresh_interval`` (a minute by default).
LAST_RUN_READS = 6


def gc_policies(
    caches: Iterable[CacheSettings],
    config: Config,
    *,
    max_size: int | None = None,
    retention: float | None = None,
) -> dict[str, Policy]:
    """Each cache's limits: ``max_size``/``retention`` given here, else its own (0: none, not
    even the configured one), else the configured retention (0 means none)."""
    policies = {}
    for cache in caches:
        size = max_size if max_size is not None else cache.gc_max_size
        keep = retention if retention is not None else cache.gc_retention
        if keep is None and config.gc_retention > 0:
            keep = config.gc_retention
        policies[cache.name] = Policy(size or None, keep or None, config.gc_grace)
    return policies


def store_policy(config: Config, max_size: int | None = None) -> Policy | None:
    cap = max_size if max_size is not None else config.gc_max_size
    return Policy(cap, None, config.gc_grace) if cap else None


async def collect(app: web.Application, *, dry_run: bool = False) -> Report:
    """One collection under the configured limits, counted in the metrics."""
    config = app[state.CONFIG]
    registry = app[state.CACHES]
    metrics = app[METRICS]
    settings = await registry.all()
    try:
        report = await app[state.COLLECTOR].run(
            gc_policies(settings, config),
            store_policy(config),
            caches=[s.name for s in settings],
            grace=config.gc_grace,
            dry_run=dry_run,
        )
    except CollectionBusy:
        metrics.gc_runs.labels("busy").inc()
        raise
    except (LarderError, OSError):
        metrics.gc_runs.labels("failed").inc()
        raise
    count_report(metrics, report)
    return report


def count_report(metrics: Metrics, report: Report) -> None:
    metrics.gc_runs.labels("completed").inc()
    for cache, part in report.caches.items():
        metrics.add_cache(cache)
        for kind, gone in part.evicted.items():
            metrics.gc_evicted.labels(cache, kind).inc(gone.objects)
    metrics.gc_freed.inc(report.evicted_bytes + report.blob_bytes_reaped)
    metrics.gc_reaped.inc(report.blobs_reaped)
    metrics.gc_restored.inc(report.restored)
    metrics.gc_last.set(report.finished)
    metrics.gc_duration.set(report.finished - report.started)


async def _last_run_finished(app: web.Application) -> float | None:
    """When the store's last recorded collection finished (``gc/last-run``), also exported as
    ``larder_gc_last_completed_timestamp_seconds``."""
    data = await app[state.STORAGE].get(GC_LAST_RUN)
    if data is None:
        return None
    try:
        finished = float(json.loads(data)["finished"])
    except (ValueError, KeyError, TypeError):
        return None
    if finished > 0:
        app[METRICS].gc_last.set(finished)
    return finished


async def _collect_when_due(app: web.Application) -> None:
    interval = app[state.CONFIG].gc_interval
    finished = await _last_run_finished(app)
    now = time.time()
    if finished is not None and finished > now + interval:
        # Written by a host whose clock runs ahead: trusted, it would hold off every
        # collection until this clock caught up with it.
        ahead = finished - now
        log.warning("the last collection says it finished %.0f s from now; collecting", ahead)
    elif finished is not None and now - finished < 0.9 * interval:
        return  # another replica collected recently
    try:
        report = await collect(app)
    except CollectionBusy as exc:
        log.info("garbage collection skipped: %s", exc.message)
        return
    log.info("garbage collection done:\n%s", report.render())
    left = app[state.COLLECTOR].left
    if left is not None and app[state.CONFIG].usage_interval > 0:
        await _set_gauges(app, left, list(report.caches))  # the store as the collection left it


async def _scan_usage(app: web.Application) -> None:
    collector = app[state.COLLECTOR]
    names = await app[state.CACHES].names()
    snapshot = await read_snapshot(app[state.STORAGE], names, collector.known)
    collector.known = snapshot.entries
    await _set_gauges(app, snapshot, names)


async def _set_gauges(app: web.Application, snapshot: Snapshot, names: list[str]) -> None:
    """``larder_storage_objects`` and ``_size_bytes`` of every cache from a listing. Counted on
    a thread, over copies of the listing (a collection may replace entries meanwhile): on the
    event loop, a million objects held every request up for 1.5-2.6 s."""
    metrics = app[METRICS]
    listing = Snapshot(snapshot.started, dict(snapshot.entries), dict(snapshot.blobs))
    totals = await asyncio.to_thread(_usage, listing, names)
    for cache in names:
        metrics.add_cache(cache)
        for kind, counted in totals[cache].items():
            metrics.objects.labels(cache, kind).set(counted.objects)
            metrics.stored_bytes.labels(cache, kind).set(counted.bytes)


def _usage(snapshot: Snapshot, names: list[str]) -> dict[str, dict[str, Tally]]:
    """``cache -> kind -> Tally`` of ``names`` in ``snapshot``."""
    grouped = snapshot.by_cache()
    return {cache: tally(grouped.get(cache, {}).values(), snapshot.blobs) for cache in names}


async def _flush_uses(app: web.Application) -> None:
    try:
        await app[state.RECORDER].flush()
    except LarderError:
        app[METRICS].use_flushes.labels("failed").inc()
        raise
    app[METRICS].use_flushes.labels("ok").inc()


async def _every(
    interval: float, what: str, work: Callable[[], Awaitable[None]], first: float | None = None
) -> None:
    """``work()`` every ``interval`` seconds (the first time after ``first``); failures are
    logged and the loop goes on."""
    await asyncio.sleep(interval if first is None else first)
    while True:
        try:
            await work()
        except LarderError as exc:
            log.warning("%s failed: %s", what, exc.message)
        await asyncio.sleep(interval)


async def _read_store_records(app: web.Application) -> None:
    """Export the store's last completed collection (this replica's, another's or a scheduled
    ``larder gc``'s), not 0; and create the series of caches made since start (``larder cache
    create`` on another machine), at 0, so that a rate over them counts their first requests."""
    try:
        await _last_run_finished(app)
    except LarderError as exc:
        log.info("could not read the last collection's record: %s", exc.message)
    try:
        names = await app[state.CACHES].names()
    except LarderError as exc:
        log.info("could not list the caches: %s", exc.message)
        return
    metrics = app[METRICS]
    for cache in names:
        metrics.add_cache(cache)


async def _housekeep_storage(app: web.Application) -> None:
    """At start: the backend's housekeeping (on disk: the reserve a collection needs on a full
    disk, which must exist before the disk fills up, and stale temporaries)."""
    try:
        await app[state.STORAGE].housekeep()
    except LarderError as exc:
        log.warning("storage housekeeping at start-up failed: %s", exc.message)


def start(app: web.Application, scans: bool = True) -> list[asyncio.Task[None]]:
    """The background tasks the config asks for (the caller cancels them at shutdown); without
    ``scans`` only the recorded uses are written (the other workers of a server)."""
    config = app[state.CONFIG]
    tasks = []
    if scans:
        tasks.append(asyncio.create_task(_housekeep_storage(app)))
    if scans and config.usage_interval > 0:
        tasks.append(
            asyncio.create_task(
                _every(config.usage_interval, "storage usage scan", lambda: _scan_usage(app), 0)
            )
        )
    tasks.append(
        asyncio.create_task(
            _every(config.use_flush_interval, "writing recorded uses", lambda: _flush_uses(app))
        )
    )
    if scans:
        period = max(LAST_RUN_READS * config.refresh_interval, 1.0)
        tasks.append(
            asyncio.create_task(
                _every(period, "reading the store's records", lambda: _read_store_records(app), 0)
            )
        )
    if scans and config.gc_interval > 0:
        # Replicas started together spread out; each then checks gc/last-run before it runs.
        first = config.gc_interval * random.uniform(0.5, 1.0)
        tasks.append(
            asyncio.create_task(
                _every(
                    config.gc_interval, "garbage collection", lambda: _collect_when_due(app), first
                )
            )
        )
    return tasks


async def stop(app: web.Application, tasks: list[asyncio.Task[None]]) -> None:
    """Cancel the background tasks and write the last recorded uses."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if app[state.RECORDER].pending:
        try:
            await _flush_uses(app)
        except LarderError as exc:
            log.warning("could not write recorded uses at shutdown: %s", exc.message)
