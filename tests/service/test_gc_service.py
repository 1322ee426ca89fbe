"""Garbage collection in the service: reads record uses, serve collects on its own, metrics."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from larder.core import keys
from larder.core.lastuse import load_uses
from larder.service import housekeeping, state
from larder.service.state import METRICS
from larder.storage.disk import RESERVE_SIZE, DiskStorage
from larder.storage.memory import MemoryStorage
from tests.service.conftest import ServiceFactory
from tests.service.test_nix_routes import hash_part, make_nar, nar_url, push, store_path
from tests.service.test_rustc_routes import KEY, blob_id, manifest_for, upload
from tests.service.test_webdav import ENTRY


async def test_hits_are_recorded_as_uses_and_misses_are_not(make_service: ServiceFactory) -> None:
    service = await make_service()
    path = store_path("recorded")
    nar = make_nar(b"recorded")
    await push(service, path, nar, [path])
    await upload(service, {"liba.rlib": b"rlib bytes"})
    resp = await service.client.put(
        f"/main/rustc/manifests/{KEY}",
        data=manifest_for({"liba.rlib": b"rlib bytes"}),
        headers=service.auth(),
    )
    assert resp.status == 200
    assert (await service.client.put(ENTRY, data=b"entry", headers=service.auth())).status == 201
    await service.client.app[state.RECORDER].flush()  # uploads record nothing: they are writes
    assert (await load_uses(service.storage, "main")).times == {}

    for target in (
        f"/main/{hash_part(path)}.narinfo",
        f"/main/nar/{nar_url(nar, '')[4:-4]}.nar.zst",
        f"/main/rustc/manifests/{KEY}",
        f"/main/rustc/blobs/{blob_id(b'rlib bytes')}",
        ENTRY,
        f"/main/{'0' * 32}.narinfo",  # a miss
    ):
        resp = await service.client.get(target)
        assert resp.status in (200, 404), target
        await resp.read()
    assert await service.client.app[state.RECORDER].flush() == 5
    uses = (await load_uses(service.storage, "main")).times
    assert set(uses) == {
        f"narinfo/{hash_part(path)}",
        f"nar/{nar_url(nar, '')[4:-4]}",
        f"rustc/manifest/{KEY}",
        f"rustc/blob/{blob_id(b'rlib bytes')}",
        "sccache/" + ENTRY.removeprefix("/main/sccache/"),
    }
    assert all(abs(when - time.time()) < 5 for when in uses.values())


async def test_serve_collects_on_its_own_and_counts_it(make_service: ServiceFactory) -> None:
    service = await make_service(
        gc_interval=0.3, gc_grace=1.0, gc_max_size=1, use_flush_interval=0.1, usage_interval=0
    )
    old = store_path("collected")
    await push(service, old, make_nar(b"old"), [old])
    resp = await service.client.get(f"/main/{hash_part(old)}.narinfo")
    assert resp.status == 200  # now remembered by the replica
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if await service.storage.get(keys.GC_LAST_RUN) is not None:
            last = json.loads(await service.storage.get(keys.GC_LAST_RUN) or b"{}")
            # (the record of the NAR's upload name, never read, may go a run earlier)
            if last["caches"].get("main", {}).get("evicted", {}).get("narinfo", {}).get("objects"):
                break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("no collection evicted anything")
    # Gone at once on this replica, although it had served the narinfo moments ago.
    assert (await service.client.get(f"/main/{hash_part(old)}.narinfo")).status == 404
    metrics = await (await service.client.get("/metrics")).text()
    assert 'larder_gc_runs_total{result="completed"}' in metrics
    evicted = [
        line
        for line in metrics.splitlines()
        if line.startswith('larder_gc_evicted_objects_total{cache="main",kind="narinfo"}')
    ]
    assert evicted and float(evicted[0].split()[-1]) >= 1
    assert [b async for b in service.storage.blob_ids()] == []


async def test_a_replica_skips_a_collection_another_just_did(
    make_service: ServiceFactory,
) -> None:
    service = await make_service(gc_interval=3600, gc_grace=1.0, usage_interval=0)
    app = service.client.app
    report = await housekeeping.collect(app)
    assert not report.dry_run and await service.storage.get(keys.GC_LAST_RUN) is not None
    completed = app[METRICS].gc_runs.labels("completed")
    runs = completed._value.get()
    await housekeeping._collect_when_due(app)
    assert completed._value.get() == runs  # not due: another replica finished one just now
    await service.storage.delete(keys.GC_LAST_RUN)
    await housekeeping._collect_when_due(app)
    assert completed._value.get() == runs + 1


async def test_a_last_collection_dated_ahead_by_a_fast_clock_holds_off_no_collection(
    make_service: ServiceFactory,
) -> None:
    """A collector whose clock ran a day ahead wrote a finish a day from now: every replica
    took it for a collection just done, and none collected until their clocks caught up."""
    service = await make_service(gc_interval=3600, gc_grace=1.0, usage_interval=0)
    app = service.client.app
    future = json.dumps({"finished": time.time() + 86_400}).encode()
    await service.storage.put(keys.GC_LAST_RUN, future)
    completed = app[METRICS].gc_runs.labels("completed")
    runs = completed._value.get()
    await housekeeping._collect_when_due(app)
    assert completed._value.get() == runs + 1


async def test_a_replica_starts_with_the_stores_last_collection_not_zero(
    make_service: ServiceFactory,
) -> None:
    # A run another replica (or this one before a restart) completed two hours ago.
    storage = MemoryStorage()
    finished = time.time() - 7200
    await storage.put(keys.GC_LAST_RUN, json.dumps({"finished": finished}).encode())
    service = await make_service(storage, gc_interval=3600, usage_interval=0)
    gauge = "larder_gc_last_completed_timestamp_seconds"

    async def exported() -> float:
        text = await (await service.client.get("/metrics")).text()
        return float(next(line for line in text.splitlines() if line.startswith(gauge)).split()[1])

    deadline = time.monotonic() + 10
    while await exported() != finished and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert await exported() == finished  # so "time since the last collection" stays true


async def test_a_scheduled_collection_is_exported_without_gc_interval(
    make_service: ServiceFactory,
) -> None:
    """With gc_interval 0 a scheduled `larder gc` collects: the gauge follows its gc/last-run
    while the server runs, or the alert on stale collections could never fire."""
    storage = MemoryStorage()
    service = await make_service(storage, gc_interval=0, usage_interval=0, refresh_interval=0.1)
    gauge = "larder_gc_last_completed_timestamp_seconds"

    async def exported() -> float:
        text = await (await service.client.get("/metrics")).text()
        return float(next(line for line in text.splitlines() if line.startswith(gauge)).split()[1])

    await asyncio.sleep(0.2)
    assert await exported() == 0  # never collected
    finished = time.time() - 60  # the job, after the server started
    await storage.put(keys.GC_LAST_RUN, json.dumps({"finished": finished}).encode())
    deadline = time.monotonic() + 10
    while await exported() != finished and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert await exported() == finished


async def test_a_disk_store_gets_its_reserve_when_serve_starts(
    make_service: ServiceFactory, tmp_path: Path
) -> None:
    """The reserve that lets a collection start on a full disk must be there before the disk
    fills up, not only after the first collection (an hour after start by default)."""
    await make_service(DiskStorage(tmp_path), gc_interval=3600, usage_interval=0)
    reserve = tmp_path / "tmp" / "reserve"
    deadline = time.monotonic() + 10
    while not reserve.exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert reserve.stat().st_size == RESERVE_SIZE
