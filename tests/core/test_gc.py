"""Garbage collection over a real store (memory backend, controlled clock): eviction order,
closures, pins, retention, blobs, dry runs, racing writes, the lease, failures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import larder.core.gc.collector as collector_module
from larder.core import keys
from larder.core.gc.collector import Collector, Report
from larder.core.gc.lock import CollectionBusy, Lease, LeaseLost, acquire, held
from larder.core.gc.plan import Policy
from larder.core.pins import pin
from larder.errors import StorageFull, StorageUnavailable
from larder.protocol.inputs import Identity, InputsDocument
from larder.protocol.rustc import Manifest, Output
from larder.storage.base import ObjectInfo
from larder.storage.memory import MemoryStorage
from tests.core.gcworld import GRACE, body, hash_part, make_world, payload, store_path
from tests.core.gcworld import ClockedWorld as World


@pytest.fixture
async def world() -> AsyncIterator[World]:
    made = await make_world()
    yield made
    made.executor.shutdown()


async def collect(world: World, dry_run: bool = False, **limits: float | None) -> Report:
    policy = Policy(
        max_size=int(limits["max_size"]) if limits.get("max_size") is not None else None,
        retention=limits.get("retention"),
        grace=GRACE,
    )
    return await world.collector.run(
        {"main": policy}, caches=["main"], grace=GRACE, dry_run=dry_run
    )


async def three_closures(world: World) -> tuple[list[str], list[str], list[str]]:
    """A, B, C pushed 100 s apart, A then read, everything older than the grace."""
    a = await world.push_closure("a")
    world.clock.advance(100)
    b = await world.push_closure("b")
    world.clock.advance(100)
    c = await world.push_closure("c")
    world.clock.advance(100)
    await world.use(a[-1])  # reading the top of A: its whole closure counts as used
    world.clock.advance(GRACE + 1)
    return a, b, c


async def test_cap_evicts_the_least_recently_used_closure_whole(world: World) -> None:
    a, b, c = await three_closures(world)
    full = report_size(await collect(world, dry_run=True))
    per_closure = full // 3  # the closures are alike but for their names
    blobs_before = await world.blob_count()

    report = await collect(world, max_size=full - per_closure + 10)

    for path in b:
        assert await world.gone(path), f"{path} of the oldest closure survived"
    for path in (*a, *c):
        assert await world.whole(path), f"{path} lost part of its closure"
    assert report.caches["main"].size_after <= report.caches["main"].max_size  # type: ignore[operator]
    assert report.caches["main"].evicted["narinfo"].objects == 3
    assert report.caches["main"].evicted["nar"].objects == 3
    assert report.blobs_reaped == 3
    assert await world.blob_count() == blobs_before - 3
    # The report says what is left, and it is what a new listing finds.
    again = await collect(world, dry_run=True)
    assert again.caches["main"].size_before == report.caches["main"].size_after
    assert again.evicted_objects == 0


async def test_a_shared_dependency_stays_while_a_referrer_stays(world: World) -> None:
    shared = await world.push("shared", 3000)
    old = await world.push("old-top", 1000, [shared])
    world.clock.advance(100)
    new = await world.push("new-top", 1000, [shared])
    world.clock.advance(GRACE + 1)
    size = report_size(await collect(world, dry_run=True))
    await collect(world, max_size=size - 1)  # the least recently used path must go
    assert await world.gone(old)
    assert await world.whole(new)  # with shared, which old-top also referred to
    await collect(world, max_size=1)
    assert await world.gone(new) and await world.gone(shared)


async def test_reading_a_path_keeps_it_and_its_closure(world: World) -> None:
    shared = await world.push("dep", 3000)
    top_old = await world.push("top-old", 1000, [shared])
    world.clock.advance(100)
    top_new = await world.push("top-new", 1000, [])
    world.clock.advance(100)
    await world.use(top_old)
    world.clock.advance(GRACE + 1)
    # Room for one of the two closures: top-old was read last, so top-new goes.
    report = await collect(world, max_size=5500)
    assert await world.gone(top_new)
    assert await world.whole(top_old)
    assert report.caches["main"].size_after <= 5500


async def test_retention_evicts_what_was_not_used_within_it(world: World) -> None:
    a, b, c = await three_closures(world)
    report = await collect(world, retention=GRACE + 150)
    # Used: A read 601 s before the run, C pushed 701 s before, B 801 s; retention 750 s.
    for path in b:
        assert await world.gone(path)
    for path in (*a, *c):
        assert await world.whole(path)
    assert report.evicted_objects == 6  # three narinfos and their NAR records


async def test_pinned_closures_are_never_evicted(world: World) -> None:
    a, b, c = await three_closures(world)
    await pin(world.storage, "main", b[-1])
    await pin(world.storage, "main", store_path("not-pushed-yet"))
    report = await collect(world, max_size=1)
    for path in b:
        assert await world.whole(path)
    for path in (*a, *c):
        assert await world.gone(path)
    assert report.caches["main"].size_after > 0


async def test_recent_uploads_are_kept_over_the_cap(world: World) -> None:
    a = await world.push_closure("fresh")
    report = await collect(world, max_size=1)
    assert report.evicted_objects == 0
    for path in a:
        assert await world.whole(path)


async def test_dry_run_changes_nothing(world: World) -> None:
    await three_closures(world)
    await world.recorder.flush()
    before = await world.storage.state()
    report = await collect(world, dry_run=True, max_size=1)
    assert report.dry_run and report.evicted_objects == 18 and report.blobs_reaped == 9
    assert await world.storage.state() == before
    # The run itself does and counts what the dry run said, its reaped blobs included.
    done = await collect(world, max_size=1)
    assert (done.evicted_objects, done.blobs_reaped) == (18, 9)
    assert done.blob_bytes_reaped == report.blob_bytes_reaped
    assert done.caches["main"].evicted == report.caches["main"].evicted
    assert done.store_size_after == report.store_size_after


async def test_other_caches_lose_nothing_to_one_caches_limits(world: World) -> None:
    await world.registry.ensure("pr")
    mine = await world.push_closure("main-stuff")
    theirs = [await world.push("pr-stuff", cache="pr")]
    world.clock.advance(GRACE + 1)
    await world.collector.run(
        {"main": Policy(max_size=1, grace=GRACE)}, caches=["main", "pr"], grace=GRACE
    )
    assert all([await world.gone(p) for p in mine])
    assert await world.whole(theirs[0], "pr")


async def test_the_store_cap_counts_every_cache_and_shared_blobs_once(world: World) -> None:
    await world.registry.ensure("pr")
    old = await world.push("same", 5000)
    world.clock.advance(100)
    twin = await world.push("same", 5000, cache="pr")  # same NAR, other cache: one blob
    world.clock.advance(100)
    other = await world.push("other", 5000)
    world.clock.advance(GRACE + 1)
    dry = await world.collector.run({}, caches=["main", "pr"], grace=GRACE, dry_run=True)
    cap = dry.store_size_before - 4000  # freeing that takes the blob of "same"
    report = await world.collector.run(
        {}, Policy(max_size=cap, grace=GRACE), caches=["main", "pr"], grace=GRACE
    )
    # Evicting main's "same" frees no blob (pr still holds it), so "pr" goes too.
    assert await world.gone(old) and await world.gone(twin, "pr")
    assert await world.whole(other)
    assert report.store_size_after <= cap


async def test_orphan_blobs_are_reaped_after_the_grace(world: World) -> None:
    settings_ = world.main
    await world.sccache.put(settings_, "a/b/old", body(b"old entry"))
    await world.storage.delete(keys.sccache_entry("main", "a/b/old"))  # as a WebDAV DELETE
    world.clock.advance(GRACE + 1)
    await world.sccache.put(settings_, "a/b/young", body(b"young entry"))
    await world.storage.delete(keys.sccache_entry("main", "a/b/young"))
    report = await collect(world)
    assert report.blobs_reaped == 1
    young = blake3.blake3(b"young entry").hexdigest()
    assert [b async for b in world.storage.blob_ids()] == [young]


async def test_a_blob_committed_within_the_grace_before_the_run_is_kept(world: World) -> None:
    """A blob whose record is not written yet (an upload between committing its blob and
    writing its record, or a slow client) must survive a run that starts less than the grace
    after it was committed: reaping it would lose the upload's content."""
    await world.sccache.put(world.main, "a/b/old", body(b"old entry"))
    await world.storage.delete(keys.sccache_entry("main", "a/b/old"))
    world.clock.advance(GRACE + 1)
    await world.sccache.put(world.main, "a/b/young", body(b"young entry"))
    await world.storage.delete(keys.sccache_entry("main", "a/b/young"))
    world.clock.advance(GRACE / 2)  # committed 300 s before the run: inside the 600 s grace
    report = await collect(world)
    assert report.blobs_reaped == 1  # the old one, older than the grace
    young = blake3.blake3(b"young entry").hexdigest()
    assert [b async for b in world.storage.blob_ids()] == [young]


async def test_referrers_are_deleted_before_what_they_refer_to(world: World) -> None:
    """A client substituting while a collection runs, or after one that failed midway, must
    never find a narinfo whose references or NAR are already gone: it would fail to fetch a
    closure the cache still advertises."""
    a, b, c = await three_closures(world)
    refers: dict[str, set[str]] = {}
    for path in (*a, *b, *c):
        info = await world.narinfo(path)
        assert info is not None
        key = keys.narinfo("main", hash_part(path))
        refers[key] = {keys.narinfo("main", hash_part(r.full)) for r in info.references} - {key}
        refers[key].add(keys.nar("main", info.nar_hash.nix32()))
    order: list[str] = []

    async def slow_narinfos(key: str) -> None:
        if key in refers:  # a slow delete lets any other delete under way go first
            for _ in range(10):
                await asyncio.sleep(0)
        order.append(key)

    world.storage.before_delete = slow_narinfos
    await collect(world, max_size=1)
    assert set(refers) <= set(order)
    for key, targets in refers.items():
        for target in targets:
            assert order.index(key) < order.index(target), f"{target} deleted before {key}"


async def test_a_path_written_again_during_the_run_stays_with_its_closure(
    world: World,
) -> None:
    a, b, c = await three_closures(world)
    top = keys.narinfo("main", hash_part(b[-1]))
    rewritten = await world.storage.get(top)
    assert rewritten is not None

    async def rewrite_first(key: str) -> None:
        if key == top:
            world.storage.before_delete = None
            await world.storage.put(top, rewritten)  # Nix re-uploads it meanwhile

    world.storage.before_delete = rewrite_first
    report = await collect(world, max_size=1)
    assert report.kept_rewritten >= 1
    for path in b:
        assert await world.whole(path)
    for path in (*a, *c):
        assert await world.gone(path)


async def test_an_upload_referring_to_an_evicted_path_gets_it_back(world: World) -> None:
    a, b, c = await three_closures(world)
    bottom = keys.narinfo("main", hash_part(b[0]))
    newcomer: list[str] = []

    async def upload_first(key: str) -> None:
        if key == bottom:
            world.storage.before_delete = None
            # Nix saw b-0 in the cache, so it uploads only the new path that refers to it.
            newcomer.append(await world.push("newcomer", 1000, [b[0]]))

    world.storage.before_delete = upload_first
    report = await collect(world, max_size=1)
    assert newcomer and await world.whole(newcomer[0])
    assert await world.whole(b[0])
    assert report.restored >= 2  # the narinfo and its NAR record
    for path in (*a, *c, *b[1:]):
        assert await world.gone(path)


async def test_what_a_path_written_again_refers_to_is_never_deleted(world: World) -> None:
    """A path Nix uploads again while the collection runs stays, and so does its closure, which
    must not even be deleted for a while and put back: a client substituting meanwhile would
    find the top but not its dependencies."""
    a, b, c = await three_closures(world)
    top = keys.narinfo("main", hash_part(b[-1]))
    rewritten = await world.storage.get(top)
    assert rewritten is not None
    offered: list[str] = []

    async def rewrite_first(key: str) -> None:
        offered.append(key)
        if key == top:
            await world.storage.put(top, rewritten)  # Nix re-uploads it meanwhile

    world.storage.before_delete = rewrite_first
    report = await collect(world, max_size=1)
    closure = set()
    for path in b:
        info = await world.narinfo(path)
        assert info is not None
        closure |= {keys.narinfo("main", hash_part(path)), keys.nar("main", info.nar_hash.nix32())}
    assert [key for key in offered if key in closure] == [top]
    assert report.restored == 0
    assert report.kept_rewritten == len(closure)
    for path in b:
        assert await world.whole(path)
    for path in (*a, *c):
        assert await world.gone(path)


async def test_what_is_referred_to_is_put_back_before_what_refers_to_it(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upload during the run refers to a closure the run deleted, which goes back: while
    it does, a client must never find a narinfo whose references or NAR are not back yet."""
    _, b, _ = await three_closures(world)
    top = keys.narinfo("main", hash_part(b[-1]))
    newcomer: list[str] = []

    async def upload_first(key: str) -> None:
        if key == top:  # Nix saw b's top in the cache, and uploads a path that refers to it
            world.storage.before_delete = None
            newcomer.append(await world.push("newcomer", 1000, [b[-1]]))

    put_back: list[str] = []
    real_put_if_absent = world.storage.put_if_absent

    async def put_if_absent(key: str, data: bytes) -> bool:
        put_back.append(key)
        return await real_put_if_absent(key, data)

    world.storage.before_delete = upload_first
    monkeypatch.setattr(world.storage, "put_if_absent", put_if_absent)
    report = await collect(world, max_size=1)
    assert newcomer and await world.whole(newcomer[0])
    assert report.restored == 6  # b's three narinfos and their NAR records
    put_back = [key for key in put_back if key.startswith("caches/")]
    for path in b:
        info = await world.narinfo(path)
        assert info is not None
        key = keys.narinfo("main", hash_part(path))
        for target in [keys.nar("main", info.nar_hash.nix32())] + [
            keys.narinfo("main", hash_part(r.full)) for r in info.references if r.full != path
        ]:
            assert put_back.index(target) < put_back.index(key), f"{key} back before {target}"


async def test_a_collector_that_lost_its_lease_stops_deleting(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A collector that failed to renew its lease (its storage was slow, it was paused) may
    have been taken over: it must stop before its next step of deletions, or two collectors
    with different listings delete at once."""
    a, b, c = await three_closures(world)
    leases: list[Lease] = []
    real_held = held

    def capture(*args: Any, **kwargs: Any) -> Any:
        @contextlib.asynccontextmanager
        async def holding() -> AsyncIterator[Lease]:
            async with real_held(*args, **kwargs) as lease:
                leases.append(lease)
                yield lease

        return holding()

    async def lose_lease(key: str) -> None:
        world.storage.before_delete = None
        leases[0].lost = LeaseLost("another collection took over this one's lease; stopping")

    monkeypatch.setattr(collector_module, "held", capture)
    world.storage.before_delete = lose_lease
    with pytest.raises(LeaseLost):
        await collect(world, max_size=1)
    for path in (*a, *b, *c):
        assert await world.gone(path) or await world.whole(path)
    for closure in (a, b, c):  # only the first wave's deletions, the tops, were made
        assert await world.whole(closure[0])


async def test_an_upload_during_the_run_gets_its_reference_back_after_a_usage_scan(
    world: World,
) -> None:
    """A serving replica's usage scan (every ``usage_interval``) lists the store with the
    collector's ``known`` entries and keeps its listing there, also while a collection runs:
    the restore step must still see the upload made during the run as new."""
    from larder.core.gc.graph import read_snapshot

    _, b, _ = await three_closures(world)
    bottom = keys.narinfo("main", hash_part(b[0]))
    newcomer: list[str] = []

    async def upload_then_scan(key: str) -> None:
        if key == bottom:
            world.storage.before_delete = None
            newcomer.append(await world.push("newcomer", 1000, [b[0]]))
            scanned = await read_snapshot(world.storage, ["main"], world.collector.known)
            world.collector.known = scanned.entries  # what the usage scan does

    world.storage.before_delete = upload_then_scan
    report = await collect(world, max_size=1)
    assert newcomer and await world.whole(newcomer[0])
    assert report.restored >= 2


async def test_a_blob_committed_again_during_the_run_is_not_reaped(world: World) -> None:
    await world.sccache.put(world.main, "x/orphan", body(b"content"))
    await world.storage.delete(keys.sccache_entry("main", "x/orphan"))
    world.clock.advance(GRACE + 1)

    async def upload_same(blob_id: str) -> None:
        world.storage.before_blob_delete = None
        await world.sccache.put(world.main, "x/again", body(b"content"))

    world.storage.before_blob_delete = upload_same
    report = await collect(world)
    assert report.blobs_reaped == 0
    entry = await world.sccache.get(world.main, "x/again")
    assert entry is not None and await world.storage.blob_stored_size(entry.blob_id) is not None


async def test_a_blob_committed_after_the_listing_is_not_judged(world: World) -> None:
    await three_closures(world)
    late: list[str] = []

    async def upload_after_listing() -> None:
        world.storage.after_blob_listing = None
        late.append(await world.push("late", 1000))

    world.storage.after_blob_listing = upload_after_listing
    await collect(world, max_size=1)
    assert late and await world.whole(late[0])


async def test_recorded_uses_are_compacted_and_not_lost(world: World) -> None:
    a, b, _ = await three_closures(world)
    await world.recorder.flush()
    batches = [k async for k in world.storage.keys(keys.USE_PREFIX)]
    assert len(batches) == 1
    await collect(world)  # no limits: nothing evicted, uses compacted
    assert [k async for k in world.storage.keys(keys.USE_PREFIX)] == []
    index = await world.storage.get(keys.use_index("main"))
    assert index is not None
    assert list(json.loads(index)) == [f"narinfo/{hash_part(a[-1])}"]
    # The compacted use still protects A.
    world.clock.advance(10)
    report = await collect(world, max_size=report_size(await collect(world, dry_run=True)) - 1)
    assert await world.whole(a[-1]) and await world.gone(b[-1])
    assert report.evicted_objects > 0


def report_size(report: Report) -> int:
    return report.caches["main"].size_before


async def test_rustc_manifests_never_point_at_missing_blobs(world: World) -> None:
    async def compile_output(name: str, data: bytes) -> Output:
        blob_id = blake3.blake3(data).hexdigest()
        await world.rustc.upload_blob(world.main, blob_id, body(data))
        return Output(name, blob_id, len(data), 0o644)

    shared = await compile_output("libshared.rmeta", payload("shared", 4000))
    first = await compile_output("libone.rlib", payload("one", 5000))
    old = Manifest("one", (shared, first))
    await world.rustc.put_manifest(world.main, "a" * 64, old.to_json())
    world.clock.advance(100)
    second = await compile_output("libtwo.rlib", payload("two", 5000))
    await world.rustc.put_manifest(
        world.main, "b" * 64, Manifest("two", (shared, second)).to_json()
    )
    world.clock.advance(GRACE + 1)
    size = report_size(await collect(world, dry_run=True))
    report = await collect(world, max_size=size - 4000)  # only freeing a blob gets there
    assert await world.rustc.get_manifest(world.main, "a" * 64) is None
    assert await world.rustc.missing(world.main, [shared.blake3, second.blake3]) == []
    assert await world.rustc.missing(world.main, [first.blake3]) == [first.blake3]
    assert report.caches["main"].evicted["rustc_manifest"].objects == 1
    assert report.caches["main"].evicted["rustc_blob"].objects == 1
    assert await world.storage.blob_stored_size(first.blake3) is None


async def test_a_manifest_takes_its_inputs_document_and_index_entry_along(world: World) -> None:
    identity = Identity("leaf", "leaf", "0.1.0", "lib", "x86_64-unknown-linux-gnu")
    for key, name in (("a" * 64, "old"), ("b" * 64, "new")):
        data = payload(name, 5000)
        blob_id = blake3.blake3(data).hexdigest()
        await world.rustc.upload_blob(world.main, blob_id, body(data))
        manifest = Manifest(name, (Output(f"lib{name}.rlib", blob_id, len(data), 0o644),))
        await world.rustc.put_manifest(world.main, key, manifest.to_json())
        inputs = {"format": "larder-rustc/1", "sources": [["src/lib.rs", name]]}
        await world.rustc.put_inputs(world.main, key, InputsDocument(identity, inputs).to_json())
        world.clock.advance(100)
    # An old manifest stored before documents were kept: collected as before.
    legacy = Manifest("legacy", (Output("liblegacy.rlib", blob_id, len(data), 0o644),))
    await world.rustc.put_manifest(world.main, "c" * 64, legacy.to_json())
    world.clock.advance(GRACE + 1)
    assert [n.key for n in await world.rustc.nearest(world.main, identity)] == ["b" * 64, "a" * 64]
    size = report_size(await collect(world, dry_run=True))
    report = await collect(world, max_size=size - 1)  # the oldest manifest goes, whole
    evicted = report.caches["main"].evicted
    assert evicted["rustc_manifest"].objects == 1
    assert evicted["rustc_inputs"].objects == 1 and evicted["rustc_crate"].objects == 1
    assert await world.rustc.get_manifest(world.main, "a" * 64) is None
    assert await world.rustc.get_inputs(world.main, "a" * 64) is None
    assert await world.rustc.get_inputs(world.main, "b" * 64) is not None
    assert [n.key for n in await world.rustc.nearest(world.main, identity)] == ["b" * 64]
    # Everything down to the last manifest: nothing of either kind is left behind.
    await collect(world, max_size=1)
    assert [k async for k in world.storage.keys("caches/main/rustc/")] == []


async def test_unused_sccache_entries_go_first(world: World) -> None:
    for name in ("one", "two", "three"):
        await world.sccache.put(world.main, f"k/{name}", body(name.encode() * 500))
        world.clock.advance(10)
    assert await world.sccache.get(world.main, "k/one") is not None  # a hit: used now
    world.clock.advance(GRACE + 1)
    size = report_size(await collect(world, dry_run=True))
    await collect(world, max_size=size - 1)
    assert await world.sccache.get(world.main, "k/two") is None
    assert await world.sccache.get(world.main, "k/one") is not None
    assert await world.sccache.get(world.main, "k/three") is not None


async def test_corrupt_objects_are_counted_not_fatal(world: World) -> None:
    await world.storage.put(keys.narinfo("main", "0" * 32), b"not a narinfo")
    await world.storage.put(keys.nar("main", "1" * 52), b"{broken")
    report = await collect(world)
    assert report.corrupt == 2
    world.clock.advance(GRACE + 1)
    report = await collect(world, max_size=1)
    assert report.evicted_objects == 2


async def test_a_second_collection_waits_for_the_first(world: World) -> None:
    await three_closures(world)
    started = asyncio.Event()
    release = asyncio.Event()

    async def pause(key: str) -> None:
        if key.startswith("caches/"):  # the first run is deleting
            started.set()
            await release.wait()

    world.storage.before_delete = pause
    first = asyncio.create_task(collect(world, max_size=1))
    await started.wait()
    with pytest.raises(CollectionBusy, match="another collection is running"):
        await Collector(world.storage, clock=world.clock).run({}, caches=["main"], grace=GRACE)
    world.storage.before_delete = None
    release.set()
    report = await first
    assert report.evicted_objects == 18
    assert await world.storage.get(keys.GC_LOCK) is None  # released
    assert await world.storage.get(keys.GC_LAST_RUN) is not None


async def test_a_collector_whose_clock_runs_ahead_judges_ages_by_the_stores(
    world: World,
) -> None:
    """The store dates objects (S3, a file server); a collector 11 minutes ahead of it took
    what was uploaded a second before for older than the 10-minute grace."""
    await world.push_closure("fresh")
    world.clock.advance(1)
    ahead = Collector(world.storage, clock=lambda: world.clock() + 660)
    report = await ahead.run(
        {"main": Policy(max_size=1, grace=GRACE)}, caches=["main"], grace=GRACE
    )
    assert report.evicted_objects == 0 and report.blobs_reaped == 0


async def test_a_read_through_a_replica_whose_clock_runs_behind_keeps_its_closure(
    world: World,
) -> None:
    """A replica 11 minutes behind the store recorded a read as 11 minutes old: outside the
    grace, the closure being read was evicted. Its batch is dated by the store too, and its
    times are moved by the difference."""
    old = await world.push_closure("old")
    other = await world.push_closure("other")
    world.clock.advance(GRACE * 10)
    world.recorder._clock = lambda: world.clock() - 660  # the replica serving the read
    await world.use(old[-1])
    await world.recorder.flush()
    world.clock.advance(1)
    await collect(world, max_size=1)
    assert await world.whole(old[-1]) and await world.gone(other[-1])


async def test_a_live_lease_is_not_taken_by_a_host_whose_clock_runs_ahead(world: World) -> None:
    await acquire(world.storage, lease=900, clock=world.clock)
    world.clock.advance(300)  # renewed every 300 s: alive
    with pytest.raises(CollectionBusy):
        await acquire(world.storage, lease=900, clock=lambda: world.clock() + 660)


async def test_a_dead_collectors_lease_is_taken_over(world: World) -> None:
    stale = await acquire(world.storage, lease=900, clock=world.clock)
    with pytest.raises(CollectionBusy):
        await acquire(world.storage, lease=900, clock=world.clock)
    world.clock.advance(901)  # the holder never renewed
    taker = await acquire(world.storage, lease=900, clock=world.clock)
    with pytest.raises(LeaseLost):
        await stale.renew(force=True)
    await stale.release()  # not its lease any more: leaves it alone
    assert await world.storage.get(keys.GC_LOCK) == taker.document
    await taker.renew(force=True)
    await taker.release()
    assert await world.storage.get(keys.GC_LOCK) is None


async def test_a_full_store_is_collected_with_its_reserve(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a full disk the lease cannot be written, nor the uses gathered since the last flush:
    the reserve makes room for the lease, and the uses are taken from memory."""
    a, b, c = await three_closures(world)  # A's use is gathered, not written yet
    storage = world.storage
    room = {"writes": 0, "reserve": 1}
    put, put_if_absent, delete_if_older = (
        storage.put, storage.put_if_absent, storage.delete_if_older
    )  # fmt: skip

    def write(call):  # type: ignore[no-untyped-def]
        async def full(key: str, data: bytes):  # type: ignore[no-untyped-def]
            if room["writes"] == 0:
                raise StorageFull(f"disk storage: put {key}: no space left on device")
            room["writes"] -= 1
            return await call(key, data)

        return full

    async def release_reserve() -> bool:
        freed, room["reserve"] = room["reserve"], 0
        room["writes"] += freed
        return bool(freed)

    async def delete(key: str, cutoff: float) -> bool:
        room["writes"] += 10  # deleting frees space
        return await delete_if_older(key, cutoff)

    monkeypatch.setattr(storage, "put", write(put))
    monkeypatch.setattr(storage, "put_if_absent", write(put_if_absent))
    monkeypatch.setattr(storage, "release_reserve", release_reserve)
    monkeypatch.setattr(storage, "delete_if_older", delete)
    report = await collect(world, retention=GRACE + 150)
    for path in b:
        assert await world.gone(path)
    for path in (*a, *c):  # A only through the use kept in memory
        assert await world.whole(path)
    assert report.evicted_objects == 6 and room["reserve"] == 0
    assert await storage.get(keys.GC_LAST_RUN) is not None
    assert await storage.get(keys.GC_LOCK) is None
    room["writes"] = room["reserve"] = 0  # full, and nothing left to free: a clear error
    with pytest.raises(StorageFull):
        await collect(world, retention=GRACE + 150)


async def test_unreachable_storage_fails_the_run_and_deletes_nothing(world: World) -> None:
    await three_closures(world)
    before = await world.storage.state()

    async def failing(prefix: str) -> AsyncIterator[ObjectInfo]:
        raise StorageUnavailable("S3 list failed: connection refused")
        yield  # pragma: no cover

    world.storage.object_infos = failing  # type: ignore[method-assign]
    with pytest.raises(StorageUnavailable):
        await collect(world, max_size=1)
    del world.storage.object_infos
    objects, blobs = await world.storage.state()
    assert blobs == before[1]
    content = [o for o in objects if o.key.startswith("caches/")]
    assert content == [o for o in before[0] if o.key.startswith("caches/")]
    assert await world.storage.get(keys.GC_LOCK) is None


async def test_a_failure_midway_leaves_every_survivor_whole(world: World) -> None:
    a, b, c = await three_closures(world)

    async def fail_later(key: str) -> None:
        if world.storage.deletes == 4:
            raise StorageUnavailable("S3 delete failed: timed out")

    world.storage.before_delete = fail_later
    with pytest.raises(StorageUnavailable):
        await collect(world, max_size=1)
    for path in (*a, *b, *c):
        assert await world.gone(path) or await world.whole(path)
    assert await world.storage.get(keys.GC_LOCK) is None


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[str, list[int], int, bool]]:
    """Paths pushed in order: (name, indexes of earlier paths it refers to, size, read later)."""
    count = draw(st.integers(1, 12))
    steps = []
    for index in range(count):
        refs = draw(st.lists(st.integers(0, index - 1), max_size=3, unique=True)) if index else []
        steps.append((f"p{index}", refs, draw(st.integers(100, 3000)), draw(st.booleans())))
    return steps


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(histories(), st.floats(0.0, 1.0))
async def test_every_survivor_is_whole_and_the_cap_is_met(
    history: list[tuple[str, list[int], int, bool]], fraction: float
) -> None:
    world = await make_world()
    try:
        paths: list[str] = []
        for name, refs, size, _ in history:
            paths.append(await world.push(name, size, [paths[r] for r in refs]))
            world.clock.advance(5)
        for path, (_, _, _, read) in zip(paths, history, strict=True):
            if read:
                await world.use(path)
        world.clock.advance(GRACE + 1)
        size = report_size(await collect(world, dry_run=True))
        cap = int(size * fraction)
        report = await collect(world, max_size=cap)
        assert report.caches["main"].size_after <= cap
        for path in paths:
            assert await world.gone(path) or await world.whole(path)
    finally:
        world.executor.shutdown()


async def test_a_held_lease_is_renewed_and_a_stolen_one_stops_the_holder() -> None:
    storage = MemoryStorage()
    async with held(storage, lease=0.3) as lease:
        await asyncio.sleep(0.5)  # longer than the term: only renewal keeps it
        with pytest.raises(CollectionBusy):
            await acquire(storage, lease=0.3)
        lease.check()
        await storage.put(keys.GC_LOCK, b'{"owner": "someone else"}')
        await asyncio.sleep(0.25)  # time must pass: past the next renewal, which finds it lost
        with pytest.raises(LeaseLost):
            lease.check()
    assert await storage.get(keys.GC_LOCK) == b'{"owner": "someone else"}'  # not ours to drop


async def test_the_name_a_compressed_nar_came_under_goes_with_its_closure(world: World) -> None:
    old = await world.push("old-xz", xz=True)
    world.clock.advance(10)
    new = await world.push("new-xz", xz=True)
    world.clock.advance(GRACE + 1)
    names = [key async for key in world.storage.keys("caches/main/nar-file/")]
    assert len(names) == 2
    full = report_size(await collect(world, dry_run=True))

    report = await collect(world, max_size=full - 10)

    assert await world.gone(old) and await world.whole(new)
    assert report.caches["main"].evicted["nar_file"].objects == 1
    left = [key async for key in world.storage.keys("caches/main/nar-file/")]
    assert len(left) == 1 and left[0] in names
    assert report.caches["main"].evicted["narinfo"].objects == 1


async def test_a_lease_whose_process_is_gone_is_taken_over_at_once(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A collector killed (-9, out of memory) on this machine held the lease for 15 minutes
    more; its process being gone is known at once."""
    import subprocess
    import sys

    from larder.core.gc import lock

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        monkeypatch.setattr(lock.os, "getpid", lambda: child.pid)
        dead = await acquire(world.storage, lease=900, clock=world.clock)  # the child's lease
        monkeypatch.undo()
        with pytest.raises(CollectionBusy, match=f"pid {child.pid}"):  # alive: its lease
            await acquire(world.storage, lease=900, clock=world.clock)
    finally:
        child.kill()
        child.wait()
    world.clock.advance(lock.SETTLED)  # a lease is judged once it has stood that long
    taker = await acquire(world.storage, lease=900, clock=world.clock)
    assert await world.storage.get(keys.GC_LOCK) == taker.document
    with pytest.raises(LeaseLost):
        await dead.renew(force=True)
    await taker.release()

    # Another machine's, boot's or pid namespace's holder, or one that recorded no start
    # time (an older larder), is never judged from here: only by its lease's age.
    for other in ({"host": "elsewhere"}, {"boot": "0"}, {"pidns": "pid:[1]"}, {"started": None}):
        holder = {**json.loads(taker.document), "pid": child.pid, **other}
        await world.storage.put(keys.GC_LOCK, json.dumps(holder).encode())
        with pytest.raises(CollectionBusy):
            await acquire(world.storage, lease=900, clock=world.clock)
        await world.storage.delete(keys.GC_LOCK)


async def test_taking_over_a_dead_lease_never_deletes_the_lease_of_another_that_did(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two collectors find the same dead holder; one takes the lease first, between the
    other's reads: the other must not delete the live lease."""
    import subprocess
    import sys

    from larder.core.gc import lock

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    monkeypatch.setattr(lock.os, "getpid", lambda: child.pid)
    await acquire(world.storage, lease=900, clock=world.clock)  # the soon dead child's lease
    monkeypatch.undo()
    child.wait()
    world.clock.advance(lock.SETTLED)
    taken: list[lock.Lease] = []
    raced = False
    real_get = world.storage.get

    async def get(key: str) -> bytes | None:
        nonlocal raced
        data = await real_get(key)
        if key == keys.GC_LOCK and not raced:  # the other collector gets there in between
            raced = True
            world.clock.advance(1)
            taken.append(await acquire(world.storage, lease=900, clock=world.clock))
        return data

    monkeypatch.setattr(world.storage, "get", get)
    with pytest.raises(CollectionBusy):
        await acquire(world.storage, lease=900, clock=world.clock)
    assert await real_get(keys.GC_LOCK) == taken[0].document


async def test_a_lease_this_process_could_not_release_is_taken_over_at_once(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A storage outage at the end of a collection leaves this process's lease behind; the
    next collection here takes it over instead of waiting out the lease, and the collection's
    own error is the one reported, not the failed release's."""
    from larder.core.gc import lock

    real_get = world.storage.get
    down = False

    async def get(key: str) -> bytes | None:
        if down:
            raise StorageUnavailable("connection refused")
        return await real_get(key)

    monkeypatch.setattr(world.storage, "get", get)
    with pytest.raises(RuntimeError, match="the collection's own"):
        async with held(world.storage, lease=900, clock=world.clock) as lease:
            down = True
            raise RuntimeError("the collection's own failure")
    down = False
    assert await world.storage.get(keys.GC_LOCK) == lease.document  # left behind
    taker = await acquire(world.storage, lease=900, clock=world.clock)
    assert await world.storage.get(keys.GC_LOCK) == taker.document
    # A lease this process still holds is alive, whoever asks from here.
    with pytest.raises(CollectionBusy):
        await acquire(world.storage, lease=900, clock=world.clock)
    world.clock.advance(lock.SETTLED)
    with pytest.raises(CollectionBusy):
        await acquire(world.storage, lease=900, clock=world.clock)
    await taker.release()


async def test_a_dead_holders_fresh_lease_is_taken_whatever_the_clocks() -> None:
    """A lease written just before its holder was killed is taken over after watching it for
    SETTLED seconds of this machine's time: a collector whose clock is behind the store's (or
    ahead) judges it the same."""
    import socket
    import subprocess
    import time

    from larder.core.gc import lock

    storage = MemoryStorage()
    gone = subprocess.Popen(["true"])
    gone.wait()
    mine = lock._process()
    holder = {"owner": "0" * 16, "host": socket.gethostname(), "pid": gone.pid,
              "since": time.time(), **mine, "started": "1"}  # fmt: skip
    for skew in (-6.0, 6.0):
        await storage.put(keys.GC_LOCK, json.dumps(holder).encode())
        taken = await acquire(storage, lease=900, clock=lambda s=skew: time.time() + s)
        assert await storage.get(keys.GC_LOCK) == taken.document
        await taken.release()


async def test_weighing_a_large_store_leaves_the_event_loop_free(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Planning over millions of objects takes seconds of pure computation: a worker whose loop
    it held sent no heartbeat and was killed, so such a collection never completed."""
    await three_closures(world)
    real_plan = collector_module.plan

    def slow_plan(*args: object, **kwargs: object) -> object:
        time.sleep(0.5)  # as long as a large store takes
        return real_plan(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(collector_module, "plan", slow_plan)
    gaps: list[float] = []

    async def ticks() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            gaps.append(time.monotonic() - last)
            last = time.monotonic()

    ticker = asyncio.ensure_future(ticks())
    try:
        await collect(world, max_size=1)
    finally:
        ticker.cancel()
    assert gaps and max(gaps) < 0.3, max(gaps)
