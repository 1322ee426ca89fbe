"""Metrics: series exist at 0, requests land with the right labels, labels stay bounded."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from multidict import CIMultiDict
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from larder.core.caches import CacheRegistry
from larder.errors import StorageUnavailable
from larder.protocol.tokens import Scope
from larder.service import state
from larder.service.observability.instrumented_storage import InstrumentedStorage
from larder.service.observability.metrics import BACKEND_OPERATIONS, Metrics
from larder.storage.base import Storage
from larder.storage.disk import DiskStorage
from larder.storage.memory import MemoryStorage
from tests.service.conftest import Service, ServiceFactory
from tests.service.test_nix_routes import hash_part, make_nar, push, store_path

MISSING = "0" * 32


async def scrape(service: Service) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = await service.client.get("/metrics")
    assert resp.status == 200
    assert resp.content_type == "text/plain"
    samples = {}
    for family in text_string_to_metric_families(await resp.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    """The sample of ``name`` with exactly ``labels``, else the sum of those with at least them
    (``KeyError`` if none has)."""
    exact = samples.get((name, tuple(sorted(labels.items()))))
    if exact is not None:
        return exact
    wanted = set(labels.items())
    found = [v for (n, have), v in samples.items() if n == name and wanted <= set(have)]
    if not found:
        raise KeyError((name, labels))
    return sum(found)


def test_every_series_of_a_cache_exists_at_zero() -> None:
    metrics = Metrics("memory")
    metrics.add_cache("main")
    names = {
        family.name
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
    }
    for name in (
        "larder_http_requests", "larder_http_request_duration_seconds",
        "larder_http_requests_in_flight", "larder_cache_lookups", "larder_transfer_sent_bytes",
        "larder_transfer_received_bytes", "larder_upload_requests", "larder_storage_objects",
        "larder_storage_size_bytes", "larder_backend_operations", "larder_backend_errors",
        "larder_gc_runs", "larder_gc_evicted_objects", "larder_gc_freed_bytes",
    ):  # fmt: skip
        assert name in names, name
    sample = metrics.lookups.labels("main", "rustc", "manifest", "hit", "reader")
    assert sample._value.get() == 0


async def test_lookups_uploads_and_bytes_land_with_labels(service: Service) -> None:
    assert (await service.client.get("/main/nix-cache-info")).status == 200
    before = await scrape(service)
    assert value(before, "larder_cache_lookups_total", cache="main", protocol="nix",
                 kind="narinfo", result="miss") == 0  # fmt: skip
    assert (await service.client.get(f"/main/{MISSING}.narinfo")).status == 404
    resp = await service.client.put(
        "/main/sccache/a/b/entry", data=b"x" * 1000, headers=service.auth()
    )
    assert resp.status == 201
    assert (await service.client.get("/main/sccache/a/b/entry")).status == 200
    assert (await service.client.put("/main/sccache/a/b/x", data=b"x")).status == 401
    bad = await service.client.put(f"/main/{MISSING}.narinfo", data=b"junk", headers=service.auth())
    assert bad.status == 400

    after = await scrape(service)
    assert value(after, "larder_cache_lookups_total", cache="main", protocol="nix",
                 kind="narinfo", result="miss") == 1  # fmt: skip
    assert value(after, "larder_cache_lookups_total", cache="main", protocol="sccache",
                 kind="entry", result="hit") == 1  # fmt: skip
    assert value(after, "larder_upload_requests_total", cache="main", protocol="sccache",
                 outcome="accepted") == 1  # fmt: skip
    assert value(after, "larder_upload_requests_total", cache="main", protocol="sccache",
                 outcome="unauthorized") == 1  # fmt: skip
    assert value(after, "larder_upload_requests_total", cache="main", protocol="nix",
                 outcome="bad_format") == 1  # fmt: skip
    assert (
        value(after, "larder_transfer_sent_bytes_total", cache="main", protocol="sccache") >= 1000
    )
    assert value(after, "larder_transfer_received_bytes_total", cache="main",
                 protocol="sccache") >= 1000  # fmt: skip
    assert value(after, "larder_http_requests_total", cache="main", protocol="nix",
                 status_class="4xx") == 2  # fmt: skip
    assert value(after, "larder_backend_operations_total", backend="memory",
                 operation="blob_write") >= 1  # fmt: skip


async def test_unknown_caches_and_paths_never_become_labels(service: Service) -> None:
    for i in range(5):
        await service.client.get(f"/nope{i}/nix-cache-info")
        await service.client.get(f"/main/{os.urandom(8).hex()}/x")
    samples = await scrape(service)
    caches = {dict(labels).get("cache") for _, labels in samples} - {None}
    assert caches == {"main", "_none"}
    assert value(samples, "larder_http_requests_total", cache="_none", protocol="nix",
                 status_class="4xx") == 5  # fmt: skip
    for _, labels in samples:
        for label_value in dict(labels).values():
            assert "/" not in label_value


async def test_a_cache_created_while_serving_gets_its_series_before_its_first_request(
    make_service: ServiceFactory,
) -> None:
    """``larder cache create`` runs in another process: without its series at 0 before its
    first request, a rate over them drops that request (a new private cache's first refusal)."""
    storage = MemoryStorage()
    service = await make_service(storage, usage_interval=0, refresh_interval=0.1)
    await CacheRegistry(storage).create("late")  # as the command-line tool does
    deadline = asyncio.get_running_loop().time() + 10
    while not any(dict(labels).get("cache") == "late" for _, labels in await scrape(service)):
        assert asyncio.get_running_loop().time() < deadline, "no series for the new cache"
        await asyncio.sleep(0.05)
    samples = await scrape(service)
    assert value(samples, "larder_access_refused_total", cache="late", protocol="nix",
                 needed="read") == 0  # fmt: skip
    assert value(samples, "larder_cache_lookups_total", cache="late", protocol="nix",
                 kind="narinfo", result="hit", role="reader") == 0  # fmt: skip


async def test_backend_errors_are_counted(make_service: ServiceFactory) -> None:
    class Down(MemoryStorage):
        fail = False

        async def get(self, key: str) -> bytes | None:
            if self.fail and key.startswith("caches/"):
                raise StorageUnavailable("bucket unreachable")
            return await super().get(key)

    storage = Down()
    service = await make_service(storage)
    storage.fail = True
    assert (await service.client.get(f"/main/{MISSING}.narinfo")).status == 503
    samples = await scrape(service)
    assert value(samples, "larder_backend_errors_total", backend="memory", operation="get") == 1
    assert value(samples, "larder_http_requests_total", cache="main", protocol="nix",
                 status_class="5xx") == 1  # fmt: skip


async def test_a_disk_store_gone_under_the_server_is_a_backend_error_not_a_miss(
    make_service: ServiceFactory, tmp_path: Path
) -> None:
    """The store's volume unmounted (its directory renamed away): 503 and backend errors that
    an alert sees, not a 404 "no cache" or a miss for everything; back in place: served."""
    root = tmp_path / "store"
    service = await make_service(DiskStorage(root), refresh_interval=0.0)
    entry = "/main/sccache/a/b/entry"
    assert (await service.client.put(entry, data=b"v", headers=service.auth())).status < 300
    assert (await service.client.get(entry)).status == 200
    before = await scrape(service)

    root.rename(tmp_path / "unmounted")
    for path in (entry, f"/main/{MISSING}.narinfo", "/main/nix-cache-info"):
        assert (await service.client.get(path)).status == 503, path
    samples = await scrape(service)
    errors = value(samples, "larder_backend_errors_total", backend="disk")
    assert errors >= 3 + value(before, "larder_backend_errors_total", backend="disk")
    assert value(samples, "larder_http_requests_total", status_class="5xx") == 3
    assert value(samples, "larder_http_requests_total", status_class="4xx") == 0

    (tmp_path / "unmounted").rename(root)
    assert await (await service.client.get(entry)).read() == b"v"
    assert (await service.client.get(f"/main/{MISSING}.narinfo")).status == 404
    assert value(await scrape(service), "larder_backend_errors_total", backend="disk") == errors


async def test_stats_api_reports_hit_rates_and_missed_crates(service: Service) -> None:
    await service.client.put("/main/sccache/k", data=b"v", headers=service.auth())
    for path in ("/main/sccache/k", "/main/sccache/k", "/main/sccache/gone"):
        await service.client.get(path)
    for crate in ("serde", "serde", "tokio"):
        resp = await service.client.get(
            "/main/rustc/manifests/" + "ab" * 32, headers={"X-Larder-Crate": crate}
        )
        assert resp.status == 404
    resp = await service.client.get("/api/v1/caches/main/stats")
    assert resp.status == 200
    stats = await resp.json()
    sccache = stats["protocols"]["sccache"]["hour"]
    assert (sccache["hits"], sccache["misses"]) == (2, 1)
    assert abs(sccache["hit_rate"] - 2 / 3) < 1e-9
    assert stats["protocols"]["rustc"]["day"]["misses"] == 3
    assert stats["top_missed_crates"][:2] == [
        {"crate": "serde", "misses": 2, "reason": None},
        {"crate": "tokio", "misses": 1, "reason": None},
    ]


async def test_private_cache_stats_need_a_token(service: Service) -> None:
    await service.client.app[state.CACHES].create("secret", private=True)
    assert (await service.client.get("/api/v1/caches/secret/stats")).status == 401
    reader = await service.issue("secret", Scope.READ)
    resp = await service.client.get("/api/v1/caches/secret/stats", headers=service.auth(reader))
    assert resp.status == 200


async def test_requests_refused_for_their_token_are_counted_by_protocol_and_need(
    service: Service,
) -> None:
    """A laptop without its read token for a private cache gets 401s that are neither hits nor
    misses: they are counted apart, or the dashboard would show nothing while it builds."""
    await service.client.app[state.CACHES].create("secret", private=True)
    reader = await service.issue("secret", Scope.READ)
    before = await scrape(service)
    for path in (f"/secret/{MISSING}.narinfo", "/secret/nix-cache-info"):
        assert (await service.client.get(path)).status == 401
    entry = "/secret/sccache/a/b/c/" + "0" * 40
    assert (await service.client.get(entry, headers=service.auth("not-a-token"))).status == 401
    resp = await service.client.put(entry, data=b"e", headers=service.auth(reader))
    assert resp.status == 403
    resp = await service.client.get(f"/secret/{MISSING}.narinfo", headers=service.auth(reader))
    assert resp.status == 404  # allowed: a miss, not a refusal
    after = await scrape(service)

    def grew(protocol: str, needed: str) -> float:
        labels = {"cache": "secret", "protocol": protocol, "needed": needed}
        name = "larder_access_refused_total"
        return value(after, name, **labels) - before.get((name, tuple(sorted(labels.items()))), 0)

    assert grew("nix", "read") == 2
    assert grew("sccache", "read") == 1
    assert grew("sccache", "write") == 1
    assert grew("nix", "write") == 0
    lookups = value(after, "larder_cache_lookups_total", cache="secret", protocol="nix",
                    kind="narinfo", result="miss")  # fmt: skip
    assert lookups == 1


def test_json_access_log_line_has_no_credentials() -> None:
    import json

    from aiohttp.test_utils import make_mocked_request

    from larder.service.observability.access_log import JsonAccessLogger
    from tests.service.conftest import capturing_logger

    logger, records = capturing_logger("larder.test.access")
    request = make_mocked_request(
        "GET", "/main/nix-cache-info", headers={"Authorization": "Bearer secret-token"}
    )

    class Answer:
        status = 200
        body_length = 42

    JsonAccessLogger(logger, "").log(request, Answer(), 0.0015)  # type: ignore[arg-type]
    line = json.loads(records[0])
    assert line["status"] == 200 and line["path"] == "/main/nix-cache-info"
    assert line["bytes"] == 42
    assert "secret-token" not in records[0]


async def test_stats_api_names_store_paths_asked_for_before_ci_pushed_them(
    service: Service,
) -> None:
    early, late, never = (store_path(n) for n in ("rust_early-1.0.0", "rust_late-0.2.0", "x-1"))
    await push(service, early, make_nar(b"early"))
    for path, times in ((early, 1), (late, 3), (never, 2)):
        for _ in range(times):
            resp = await service.client.get(f"/main/{hash_part(path)}.narinfo")
            await resp.read()
    stats = await (await service.client.get("/api/v1/caches/main/stats")).json()
    assert stats["top_missing_store_hashes"] == [
        {"store_hash": hash_part(late), "requests": 3},
        {"store_hash": hash_part(never), "requests": 2},
    ]
    assert stats["pushed_late"] == []

    await push(service, late, make_nar(b"late"))  # CI pushes it at last
    stats = await (await service.client.get("/api/v1/caches/main/stats")).json()
    assert stats["top_missing_store_hashes"] == [{"store_hash": hash_part(never), "requests": 2}]
    [entry] = stats["pushed_late"]
    assert entry["store_path"] == late and entry["requests_before_upload"] == 3
    assert {"crate": "late", "misses": 3, "reason": None} in stats["top_missed_crates"]


async def test_lookups_by_a_token_that_could_write_are_the_writers(service: Service) -> None:
    """`nix copy` asks for each path before pushing it, with CI's write token: those lookups are
    counted as role="writer" and kept out of the stats API, so readers' hit rate is theirs."""
    pushed = store_path("rust_pushed-1.0.0")
    others = await service.issue("other", Scope.ADMIN)
    reader_auth = {
        "none": {},
        "read token": service.auth(await service.issue("main", Scope.READ)),
        "another cache's admin token": service.auth(others),
        "an invalid token": service.auth("not-a-token"),
        # A public read reads no credentials: served, and never a writer's on the first one.
        "the write token twice": CIMultiDict([*service.auth().items(), *service.auth().items()]),
    }
    for headers in reader_auth.values():
        resp = await service.client.get(f"/main/{MISSING}.narinfo", headers=headers)
        assert resp.status == 404
    for headers in (service.auth(), service.basic()):  # Bearer, and netrc's Basic
        resp = await service.client.get(f"/main/{hash_part(pushed)}.narinfo", headers=headers)
        assert resp.status == 404
    await push(service, pushed, make_nar(b"pushed"))
    for headers in (service.auth(), {}):
        resp = await service.client.get(f"/main/{hash_part(pushed)}.narinfo", headers=headers)
        assert resp.status == 200
    crate = {"X-Larder-Crate": "serde", **service.auth()}
    resp = await service.client.get(f"/main/rustc/manifests/{'a' * 64}", headers=crate)
    assert resp.status == 404

    samples = await scrape(service)

    def lookups(protocol: str, kind: str, result: str, role: str) -> float:
        return value(samples, "larder_cache_lookups_total", cache="main", protocol=protocol,
                     kind=kind, result=result, role=role)  # fmt: skip

    assert lookups("nix", "narinfo", "miss", "reader") == len(reader_auth)
    assert lookups("nix", "narinfo", "miss", "writer") == 2
    assert lookups("nix", "narinfo", "hit", "reader") == 1
    assert lookups("nix", "narinfo", "hit", "writer") == 1
    assert lookups("rustc", "manifest", "miss", "writer") == 1
    assert lookups("rustc", "manifest", "miss", "reader") == 0
    stats = await (await service.client.get("/api/v1/caches/main/stats")).json()
    assert stats["top_missing_store_hashes"] == [{"store_hash": MISSING, "requests": 5}]
    assert stats["pushed_late"] == []
    assert stats["top_missed_crates"] == []


async def test_metrics_render_off_the_event_loop(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rendering grows with caches (~270 series each; 200 caches took 1.6 s): on the loop it
    held every other request up for as long."""
    import threading

    metrics = service.client.app[state.METRICS]
    rendered_on: list[threading.Thread] = []
    render = metrics.render

    def recording_render() -> bytes:
        rendered_on.append(threading.current_thread())
        return render()

    monkeypatch.setattr(metrics, "render", recording_render)
    assert (await service.client.get("/metrics")).status == 200
    assert rendered_on and rendered_on[0] is not threading.main_thread()


def test_every_counted_storage_operation_starts_at_zero() -> None:
    """Each method of the storage interface (but ``close``) is counted under its own name, a
    writer's commit as ``blob_write``, and every one of those series exists before a call."""
    interface = {
        name
        for name, member in vars(Storage).items()
        if callable(member) and not name.startswith("_") and name != "close"
    }
    counted = (interface - {"blob_writer"}) | {"blob_write"}
    assert set(BACKEND_OPERATIONS) == counted
    assert interface <= set(vars(InstrumentedStorage))  # every call goes through the counter
    metrics = Metrics("memory")
    samples = {
        sample.labels["operation"]
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        if family.name == "larder_backend_operations"
        for sample in family.samples
        if sample.name == "larder_backend_operations_total"
    }
    assert samples == counted


async def test_instrumented_storage_counts_under_the_listed_names() -> None:
    metrics = Metrics("memory")
    storage = InstrumentedStorage(MemoryStorage(), metrics)
    await storage.put("a/b", b"x")
    await storage.get("a/b")
    assert [entry async for entry in storage.object_infos("a/")]
    assert await storage.delete_if_older("a/b", 0.0) in (True, False)
    assert [blob async for blob in storage.blob_infos()] == []
    assert await storage.blob_delete_if_older("0" * 64, 0.0) in (True, False)
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        if family.name == "larder_backend_operations":
            labels = {sample.labels["operation"] for sample in family.samples}
            assert labels == set(BACKEND_OPERATIONS)


async def test_a_direct_lookup_that_finds_nothing_counts_the_crates_miss(service: Service) -> None:
    direct = "/main/rustc/direct/" + "cd" * 32
    resp = await service.client.get(direct, headers={"X-Larder-Crate": "serde"})
    assert resp.status == 404 and resp.headers["X-Larder-Counted"] == "miss"
    resp = await service.client.get(direct)  # no crate named: a plain 404, nothing counted
    assert resp.status == 404 and "X-Larder-Counted" not in resp.headers
    entry = b'{"sources":["src/lib.rs"],"env":[]}'
    resp = await service.client.put(direct, data=entry, headers=service.auth())
    assert resp.status == 200, await resp.text()
    resp = await service.client.get(direct, headers={"X-Larder-Crate": "serde"})
    assert resp.status == 200 and "X-Larder-Counted" not in resp.headers  # entries: no miss yet
    stats = await (await service.client.get("/api/v1/caches/main/stats")).json()
    assert stats["protocols"]["rustc"]["day"]["misses"] == 1
    assert stats["top_missed_crates"] == [{"crate": "serde", "misses": 1, "reason": None}]


def test_a_dead_workers_storage_gauges_go_with_it(tmp_path: Path) -> None:
    """Worker 0 scans the store; once it is killed and replaced, its last figures must not
    stay in /metrics for good (a deleted 3 MB kept showing after gc)."""
    script = (
        "import sys\n"
        "from larder.service.observability.metrics import Metrics\n"
        "m = Metrics('disk', sys.argv[1])\n"
        "m.stored_bytes.labels('main', 'nar').set(3_000_000)\n"
        "m.gc_last.set(1)\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    dead = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, check=True)
    assert dead.returncode == 0
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    def rendered() -> str:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, str(tmp_path))  # type: ignore[no-untyped-call]
        return generate_latest(registry).decode()

    pid = int(next(tmp_path.glob("gauge_*_*.db")).stem.rsplit("_", 1)[1])
    assert "larder_storage_size_bytes{" in rendered()
    multiprocess.mark_process_dead(pid, str(tmp_path))  # type: ignore[no-untyped-call]
    assert "larder_storage_size_bytes{" not in rendered()


async def test_a_blob_write_that_fails_before_its_commit_is_counted(
    make_service: ServiceFactory,
) -> None:
    """A full disk fails while the body is written (or while its temporary is made), never
    reaching a commit: the storage-errors alert must see it."""
    from larder.errors import StorageFull
    from larder.storage.memory import MemoryStorage

    class Full(MemoryStorage):
        def blob_writer(self, *, encoded=False):  # type: ignore[no-untyped-def]
            writer = super().blob_writer(encoded=encoded)

            def refuse(data: bytes | memoryview) -> None:
                raise StorageFull("no space left on device")

            writer.write = refuse  # type: ignore[method-assign]
            writer.write_encoded = refuse  # type: ignore[method-assign]
            return writer

    service = await make_service(Full())
    auth = service.auth()
    for entry in ("a", "b"):
        resp = await service.client.put(f"/main/sccache/x/{entry}", data=b"y" * 5000, headers=auth)
        assert resp.status == 507
    samples = await scrape(service)
    assert value(samples, "larder_backend_errors_total", backend="memory",
                 operation="blob_write") == 2  # fmt: skip


@pytest.mark.parametrize("ext", [".nar.zst", ".nar.xz", ".nar"])
async def test_nar_downloads_are_lookups_and_the_heads_before_an_upload_are_not(
    service: Service, ext: str
) -> None:
    """Nix asks HEAD of a NAR in its own compression before uploading it: counting that would
    make the NAR hit rate depend on how CI compresses its pushes."""
    name = f"/main/nar/{'1' * 52}{ext}"
    assert (await service.client.head(name)).status == 404
    scraped = await scrape(service)
    for result in ("hit", "miss"):
        assert value(scraped, "larder_cache_lookups_total", cache="main", protocol="nix",
                     kind="nar", result=result) == 0  # fmt: skip
    assert (await service.client.get(name)).status == 404
    misses = value(await scrape(service), "larder_cache_lookups_total", cache="main",
                   protocol="nix", kind="nar", result="miss")  # fmt: skip
    assert misses == (0 if ext == ".nar.xz" else 1)  # larder keeps no xz file: no such URL


async def test_uploads_refused_before_their_body_are_counted(make_service: ServiceFactory) -> None:
    """curl, so Nix, asks ``Expect: 100-continue`` before any body over 1 MiB, and aiohttp sends
    an expect handler's refusal without running a middleware: a 403, 413 or 507 there was in
    the access log and in no series (the storage-full alert never fired for a real push)."""
    service = await make_service(max_upload_size=10_000)
    reader = service.auth(await service.issue("main", Scope.READ))
    nar = f"/main/nar/{'0' * 52}.nar"
    asking = {"Expect": "100-continue"}
    for headers, size, status in (
        ({**reader, **asking}, 100, 403),
        ({**service.auth(), **asking}, 20_000, 413),
        ({**service.auth(), "Expect": "something-else"}, 100, 417),
    ):
        resp = await service.client.put(nar, data=b"x" * size, headers=headers)
        assert resp.status == status, await resp.text()
    resp = await service.client.post(
        "/main/rustc/missing", data=b"{}", headers={**reader, **asking}
    )
    assert resp.status == 403  # not an upload: a question
    samples = await scrape(service)
    for outcome in ("forbidden", "too_large"):
        assert value(samples, "larder_upload_requests_total", cache="main", protocol="nix",
                     outcome=outcome) == 1, outcome  # fmt: skip
    # refused before its cache is looked at
    assert value(samples, "larder_upload_requests_total", cache="_none", protocol="nix",
                 outcome="other") == 1  # fmt: skip
    assert value(samples, "larder_upload_requests_total", cache="main", protocol="rustc") == 0
    assert value(samples, "larder_http_requests_total", protocol="nix", status_class="4xx") == 3
    assert value(samples, "larder_http_requests_total", cache="main", protocol="rustc",
                 status_class="4xx") == 1  # fmt: skip


async def test_direct_entries_are_counted_as_uploads(service: Service) -> None:
    key = "a" * 64
    good = {"sources": ["src/lib.rs"], "env": []}
    for body, status in ((good, 200), ({"sources": "src/lib.rs", "env": []}, 400)):
        resp = await service.client.put(
            f"/main/rustc/direct/{key}", json=body, headers=service.auth()
        )
        assert resp.status == status, await resp.text()
    samples = await scrape(service)
    for outcome in ("accepted", "bad_format"):
        assert value(samples, "larder_upload_requests_total", cache="main", protocol="rustc",
                     outcome=outcome) == 1, outcome  # fmt: skip
