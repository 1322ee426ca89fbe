"""The sccache WebDAV routes: entries, virtual collections, PROPFIND, auth, limits."""

from __future__ import annotations

import asyncio
import os
import threading
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator

import pytest

import larder.core.sccache as sccache_module
from larder.core.sccache import Entry
from larder.errors import StorageUnavailable
from larder.protocol.dav import MAX_PATH_LENGTH, MAX_SEGMENTS
from larder.protocol.tokens import Scope
from larder.service import state
from larder.storage.base import BlobInfo, BlobWriter, LevelEntry
from larder.storage.memory import MemoryStorage
from tests.service.conftest import Service, ServiceFactory, send_raw

DAV = "{DAV:}"
ENTRY = "/main/sccache/1/b/b/1bb32ec483cb7f0389a28c868e53b94fa0bac2c17a3a1133803c5794f3e20586"
PROBE = "/main/sccache/.sccache_check"


async def records(service: Service) -> list[str]:
    return [key async for key in service.storage.keys("caches/main/sccache/")]


async def raw_status(service: Service, head: str, body: bytes = b"") -> bytes:
    """Send a request head byte for byte (no client-side path normalisation); the status."""
    return str(await send_raw(service, head, body)).encode()


async def test_probe_then_put_get_head_delete(service: Service) -> None:
    assert (await service.client.get(PROBE)).status == 404
    resp = await service.client.put(PROBE, data=b"Hello, World!", headers=service.auth())
    assert resp.status == 201
    assert await (await service.client.get(PROBE)).read() == b"Hello, World!"

    assert (await service.client.head(ENTRY)).status == 404
    body = os.urandom(200_000)
    assert (await service.client.put(ENTRY, data=body, headers=service.auth())).status == 201
    resp = await service.client.get(ENTRY)
    assert resp.status == 200 and await resp.read() == body
    assert resp.headers["Content-Type"] == "application/octet-stream"
    head = await service.client.head(ENTRY)
    assert head.status == 200 and head.content_length == len(body)
    assert (await service.client.delete(ENTRY, headers=service.auth())).status == 204
    assert (await service.client.get(ENTRY)).status == 404
    assert (await service.client.delete(ENTRY, headers=service.auth())).status == 404
    assert await records(service) == ["caches/main/sccache/.sccache_check"]


async def test_put_overwrites_and_empty_entries_work(service: Service) -> None:
    for body in (b"first", b"second", b""):
        assert (await service.client.put(ENTRY, data=body, headers=service.auth())).status == 201
        resp = await service.client.get(ENTRY)
        assert resp.status == 200 and await resp.read() == body


async def test_double_slashes_are_collapsed(service: Service) -> None:
    resp = await service.client.put("/main/sccache//a//b/entry", data=b"x", headers=service.auth())
    assert resp.status == 201
    assert await (await service.client.get("/main/sccache/a/b/entry")).read() == b"x"
    assert await (await service.client.get("/main/sccache//a/b//entry")).read() == b"x"
    assert await records(service) == ["caches/main/sccache/a/b/entry"]


def parse(xml: bytes) -> list[tuple[str, bool, str | None]]:
    root = ET.fromstring(xml)
    assert root.tag == f"{DAV}multistatus"
    found = []
    for response in root.findall(f"{DAV}response"):
        href = response.findtext(f"{DAV}href") or ""
        assert response.findtext(f"{DAV}propstat/{DAV}status") == "HTTP/1.1 200 OK"
        prop = response.find(f"{DAV}propstat/{DAV}prop")
        assert prop is not None
        assert prop.findtext(f"{DAV}getlastmodified")
        is_collection = prop.find(f"{DAV}resourcetype/{DAV}collection") is not None
        found.append((href, is_collection, prop.findtext(f"{DAV}getcontentlength")))
    return found


async def propfind(service: Service, path: str, depth: str | None) -> tuple[int, bytes]:
    headers = {} if depth is None else {"Depth": depth}
    resp = await service.client.request("PROPFIND", path, headers=headers)
    return resp.status, await resp.read()


async def test_propfind_depth_0_and_1(service: Service) -> None:
    # What sccache sends before each write: Depth 0 on the parent, with a double slash.
    status, body = await propfind(service, "/main/sccache//1/b/b/", "0")
    assert status == 207
    assert parse(body) == [("/main/sccache/1/b/b/", True, None)]  # virtual: always there

    await service.client.put(ENTRY, data=b"12345", headers=service.auth())
    await service.client.put("/main/sccache/1/c/d/other", data=b"1", headers=service.auth())
    status, body = await propfind(service, ENTRY, "0")
    assert status == 207 and parse(body) == [(ENTRY, False, "5")]
    status, body = await propfind(service, "/main/sccache/1/", "1")
    assert status == 207
    assert parse(body) == [
        ("/main/sccache/1/", True, None),
        ("/main/sccache/1/b/", True, None),
        ("/main/sccache/1/c/", True, None),
    ]
    status, body = await propfind(service, "/main/sccache/1/b/b/", "1")
    assert parse(body) == [("/main/sccache/1/b/b/", True, None), (ENTRY, False, "5")]
    status, body = await propfind(service, "/main/sccache", "0")
    assert status == 207 and parse(body) == [("/main/sccache/", True, None)]
    assert (await propfind(service, "/main/sccache/missing-entry", "0"))[0] == 404
    # A collection named without its trailing slash is still the collection (RFC 4918).
    status, body = await propfind(service, "/main/sccache/1/b/b", "1")
    assert status == 207
    assert parse(body) == [("/main/sccache/1/b/b/", True, None), (ENTRY, False, "5")]
    assert (await propfind(service, "/main/sccache/1/b/x", "0"))[0] == 404
    assert (await propfind(service, "/main/sccache/", "infinity"))[0] == 403
    assert (await propfind(service, "/main/sccache/", None))[0] == 403  # RFC 4918: infinity


async def test_options_says_what_is_offered(service: Service) -> None:
    resp = await service.client.options("/main/sccache/")
    assert resp.status == 200 and resp.headers["DAV"] == "1"
    assert set(resp.headers["Allow"].split(", ")) >= {"GET", "PUT", "PROPFIND", "MKCOL"}
    assert (await service.client.options("/nope/sccache/")).status == 404


async def test_hrefs_carry_the_prefix_of_the_public_url(make_service: ServiceFactory) -> None:
    """Behind a reverse proxy's prefix (``https://host/larder``), what larder names as a path
    is one the client can ask for."""
    service = await make_service(public_url="https://ci.example/larder/")
    await service.client.put(ENTRY, data=b"12345", headers=service.auth())
    status, body = await propfind(service, "/main/sccache/1/b/b/", "1")
    assert status == 207
    hrefs = [href for href, _, _ in parse(body)]
    assert hrefs[0] == "/larder/main/sccache/1/b/b/" and all(
        href.startswith("/larder/main/sccache/") for href in hrefs
    ), hrefs
    resp = await service.client.request("PROPFIND", "/main/", headers={"Depth": "0"})
    assert resp.status == 405 and "/larder/main/sccache/" in await resp.text()


async def test_webdav_outside_sccache_names_the_endpoint(service: Service) -> None:
    """An endpoint written without ``/sccache`` gets PROPFIND refused; the answer says where
    WebDAV is, as sccache only runs read-only without saying why."""
    for path in ("/main/", "/main", "/main/a/b/c/"):
        resp = await service.client.request("PROPFIND", path, headers={"Depth": "0"})
        assert resp.status == 405, path
        assert "/main/sccache/" in await resp.text()
    resp = await service.client.request("PROPFIND", "/nope/", headers={"Depth": "0"})
    assert resp.status == 404
    resp = await service.client.request("PROPFIND", "/main/rustc/missing")
    assert resp.status == 405 and "POST" in resp.headers["Allow"]
    # The service's own first segments keep aiohttp's 405, naming their own methods.
    for method, path in (("PROPFIND", "/metrics"), ("POST", "/metrics"),
                         ("PROPFIND", "/api/v1/caches/main"), ("MKCOL", "/healthz")):  # fmt: skip
        resp = await service.client.request(method, path)
        assert resp.status == 405, (method, path)
        assert "PROPFIND" not in resp.headers["Allow"] and "MKCOL" not in resp.headers["Allow"]
    assert (await service.client.get(f"/main/{'0' * 32}.narinfo")).status == 404  # Nix's


async def test_sccaches_start_up_probe_outside_sccache_is_a_plain_miss(service: Service) -> None:
    """sccache stops (and fails every compile) when its start-up ``GET .sccache_check`` gets
    anything but an answer or a 404: an endpoint naming only the server got 405 (the WebDAV
    refusals registered there take other methods), and a private cache's URL without a valid
    token got 401 from the Nix routes. Both 404 now, naming the endpoint; sccache then runs
    read-only, as the README says."""
    other = await service.issue("other", Scope.WRITE)
    await service.client.app[state.CACHES].ensure("priv", private=True)
    for path, headers in (("/.sccache_check", {}), ("/main/.sccache_check", {}),
                          ("/main/prefix/.sccache_check", {}), ("/priv/.sccache_check", {}),
                          ("/priv/.sccache_check", service.auth(other))):  # fmt: skip
        resp = await service.client.get(path, headers=headers)
        assert resp.status == 404, (path, resp.status)
        assert "/sccache/" in await resp.text(), path
    for path in ("/main", "/main/", "/favicon.ico"):  # nothing there: not "method not allowed"
        assert (await service.client.get(path)).status == 404, path
    assert (await service.client.get("/main/sccache/.sccache_check")).status == 404  # a miss
    assert (await service.client.get("/priv/nix-cache-info")).status == 401  # still private


async def test_only_a_get_of_an_entry_counts_as_a_lookup(service: Service) -> None:
    from tests.service.test_metrics import scrape, value

    def lookups(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> list[float]:
        labels = {"cache": "main", "protocol": "sccache", "kind": "entry"}
        name = "larder_cache_lookups_total"
        return [value(samples, name, **labels, result=r) for r in ("hit", "miss")]

    await service.client.put(ENTRY, data=b"12345", headers=service.auth())
    before = lookups(await scrape(service))
    assert (await service.client.head(ENTRY)).status == 200
    assert (await service.client.get("/main/sccache/1/b/")).status == 404  # a collection
    assert lookups(await scrape(service)) == before
    assert (await service.client.get(ENTRY)).status == 200
    assert lookups(await scrape(service)) == [before[0] + 1, before[1]]


class CountingStorage(MemoryStorage):
    """Memory storage that counts the keys and listing entries it hands out, and the reads."""

    def __init__(self) -> None:
        super().__init__()
        self.visited = 0
        self.reads = 0

    async def get(self, key: str) -> bytes | None:
        self.reads += 1
        return await super().get(key)

    async def keys(self, prefix: str) -> AsyncIterator[str]:
        async for key in super().keys(prefix):
            self.visited += 1
            yield key

    async def list_level(self, prefix: str, *, limit: int) -> AsyncIterator[LevelEntry]:
        async for entry in super().list_level(prefix, limit=limit):
            self.visited += 1
            yield entry


async def test_propfind_depth_1_lists_one_level_only(
    make_service: ServiceFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = CountingStorage()
    service = await make_service(storage)
    for i in range(3):  # entries where sccache puts them: many keys below each collection
        for j in range(100):
            await storage.put(
                f"caches/main/sccache/top/{i}/{j // 10}/{j}", Entry("0" * 64, 1, 0).to_json()
            )
    await service.client.put("/main/sccache/top/entry", data=b"12345", headers=service.auth())
    storage.visited = storage.reads = 0
    status, body = await propfind(service, "/main/sccache/top/", "1")
    assert status == 207
    assert parse(body) == [
        ("/main/sccache/top/", True, None),
        ("/main/sccache/top/0/", True, None),
        ("/main/sccache/top/1/", True, None),
        ("/main/sccache/top/2/", True, None),
        ("/main/sccache/top/entry", False, "5"),
    ]
    assert (storage.visited, storage.reads) == (4, 1)  # not the 300 keys below

    monkeypatch.setattr(sccache_module, "MAX_LISTING", 2)
    storage.visited = storage.reads = 0
    status, body = await propfind(service, "/main/sccache/top/", "1")
    assert len(parse(body)) == 1 + 2 and (storage.visited, storage.reads) == (2, 0)


async def test_mkcol(service: Service) -> None:
    mkcol = service.client.request
    assert (await mkcol("MKCOL", "/main/sccache/a/b/", headers=service.auth())).status == 201
    assert (await mkcol("MKCOL", "/main/sccache/a/b", headers=service.auth())).status == 201
    await service.client.put("/main/sccache/a/file", data=b"x", headers=service.auth())
    assert (await mkcol("MKCOL", "/main/sccache/a/file/", headers=service.auth())).status == 405
    with_body = await mkcol("MKCOL", "/main/sccache/c/", data=b"<x/>", headers=service.auth())
    assert with_body.status == 415
    assert (await mkcol("MKCOL", "/main/sccache/a/b/")).status == 401
    assert await records(service) == ["caches/main/sccache/a/file"]


async def test_delete_refuses_collections(service: Service) -> None:
    await service.client.put("/main/sccache/a/file", data=b"x", headers=service.auth())
    for target in ("/main/sccache/a/file/", "/main/sccache/a/", "/main/sccache/"):
        resp = await service.client.delete(target, headers=service.auth())
        assert resp.status == 405 and "PROPFIND" in resp.headers["Allow"], target
    assert await records(service) == ["caches/main/sccache/a/file"]


async def test_write_auth(service: Service) -> None:
    reader = await service.issue("main", Scope.READ)
    await service.client.app[state.CACHES].create("other")
    other_writer = await service.issue("other", Scope.WRITE)
    for headers, status in (
        ({}, 401),
        ({"Authorization": "Bearer not-a-token"}, 401),
        (service.auth(reader), 403),
        (service.auth(other_writer), 403),
        (service.basic(), 201),
        (service.auth(), 201),
    ):
        resp = await service.client.put(ENTRY, data=b"x", headers=headers)
        assert resp.status == status, headers
        if status == 401:
            assert resp.headers["WWW-Authenticate"].startswith("Basic")
        mkcol = await service.client.request("MKCOL", "/main/sccache/a/", headers=headers)
        assert mkcol.status == status, headers
        delete = await service.client.delete(ENTRY, headers=headers)
        assert delete.status == (204 if status == 201 else status), headers
    # A public cache ignores credentials on reads: a stale token never breaks a build.
    stale = {"Authorization": "Bearer not-a-token"}
    assert (await service.client.get(ENTRY, headers=stale)).status == 404
    assert (await service.client.request("PROPFIND", "/main/sccache/", headers=stale)).status


async def test_private_cache_reads(service: Service) -> None:
    await service.client.app[state.CACHES].create("secret", private=True)
    writer = await service.issue("secret", Scope.WRITE)
    reader = await service.issue("secret", Scope.READ)
    entry = ENTRY.replace("/main/", "/secret/")
    assert (await service.client.put(entry, data=b"e", headers=service.auth(writer))).status == 201

    assert (await service.client.get(entry)).status == 401
    assert (await service.client.head(entry)).status == 401
    assert (await service.client.get(entry, headers=service.auth())).status == 403  # for main
    assert (await service.client.request("PROPFIND", "/secret/sccache/")).status == 401
    resp = await service.client.get(entry, headers=service.basic(reader))
    assert resp.status == 200 and await resp.read() == b"e"
    propfind = await service.client.request(
        "PROPFIND", "/secret/sccache/", headers={"Depth": "0", **service.auth(reader)}
    )
    assert propfind.status == 207

    # The start-up probe of a client without a valid read token reads as "not there", so
    # sccache keeps running (read-only) instead of failing the build; its PUT is still refused.
    probe = "/secret/sccache/prefix/.sccache_check"
    await service.client.put(probe, data=b"Hello, World!", headers=service.auth(writer))
    for headers in ({}, service.auth(), {"Authorization": "Bearer not-a-token"}):
        assert (await service.client.get(probe, headers=headers)).status == 404, headers
        put = await service.client.put(probe, data=b"x", headers=headers)
        assert put.status in (401, 403), headers
    assert (await service.client.get(probe, headers=service.auth(reader))).status == 200
    assert (await service.client.get("/nosuch/sccache/.sccache_check")).status == 404


async def test_unknown_cache_is_404(service: Service) -> None:
    assert (await service.client.get("/nosuch/sccache/a/b")).status == 404
    resp = await service.client.put("/nosuch/sccache/a/b", data=b"x", headers=service.auth())
    assert resp.status in (403, 404)  # the token is for main: no cache to write either way
    assert await records(service) == []


@pytest.mark.parametrize(
    "target",
    [
        "/main/sccache/../../config/token-secret",
        "/main/sccache/a/../../../config/token-secret",
        "/main/sccache/a/%2e%2e/%2e%2e/%2e%2e/x",
        "/main/sccache/a/%2E%2E/x",
        "/main/sccache/a/./b",
        "/main/sccache/a%00b",
        "/main/sccache/a%5cb",
        "/main/sccache/a\\b",
        "/main/sccache/a%2f..%2f..%2fb",
        "/main/sccache/a%20b",
        "/main/sccache/" + "a/" * MAX_SEGMENTS + "x",
        "/main/sccache/" + "a" * (MAX_PATH_LENGTH + 1),
    ],
)
@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE", "MKCOL", "PROPFIND"])
async def test_traversal_and_bad_paths_are_400_and_store_nothing(
    service: Service, method: str, target: str
) -> None:
    auth = f"Authorization: Bearer {service.write_token}\r\nDepth: 0\r\n"
    status = await raw_status(
        service, f"{method} {target} HTTP/1.1\r\n{auth}Content-Length: 1\r\n", b"x"
    )
    assert status == b"400", (method, target)
    assert [key async for key in service.storage.keys("")] == [
        key async for key in service.storage.keys("config/")
    ]
    assert [blob async for blob in service.storage.blob_ids()] == []


async def test_longest_path_for_the_longest_cache_name(service: Service) -> None:
    name = "c" * 63
    await service.client.app[state.CACHES].create(name)
    writer = await service.issue(name, Scope.WRITE)
    segment = "s" * 32
    path = "/".join([segment] * 16)[:MAX_PATH_LENGTH]
    assert len(path) == MAX_PATH_LENGTH
    resp = await service.client.put(
        f"/{name}/sccache/{path}", data=b"x", headers=service.auth(writer)
    )
    assert resp.status == 201
    assert await (await service.client.get(f"/{name}/sccache/{path}")).read() == b"x"


async def test_oversize_puts_are_413_and_store_nothing(make_service: ServiceFactory) -> None:
    service = await make_service(max_upload_size=1000)
    resp = await service.client.put(ENTRY, data=os.urandom(5000), headers=service.auth())
    assert resp.status == 413

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: caught while streaming
        for _ in range(10):
            yield os.urandom(300)

    resp = await service.client.put(ENTRY, data=chunked(), headers=service.auth())
    assert resp.status == 413
    assert (await service.client.put(ENTRY, data=b"x" * 1000, headers=service.auth())).status == 201
    assert (await service.client.get(ENTRY)).content_length == 1000
    await service.client.delete(ENTRY, headers=service.auth())
    assert await records(service) == []


async def test_expect_continue_refuses_before_the_body(make_service: ServiceFactory) -> None:
    service = await make_service(max_upload_size=1000)
    bearer = f"Authorization: Bearer {service.write_token}\r\n"
    for headers, status in (
        ("Content-Length: 10\r\n", b"401"),
        (bearer + "Content-Length: 1001\r\n", b"413"),
        (bearer + "Content-Length: 10\r\n", b"100"),
    ):
        head = f"PUT {ENTRY} HTTP/1.1\r\nExpect: 100-continue\r\n{headers}"
        assert await raw_status(service, head) == status, headers
    assert await records(service) == []


class _WatchedWriter(BlobWriter):
    def __init__(self, inner: BlobWriter, owner: WatchedStorage) -> None:
        self._inner = inner
        self._owner = owner

    def write(self, data: bytes | memoryview) -> None:
        self._inner.write(data)
        self._owner.written += len(data)

    @property
    def size(self) -> int:
        return self._inner.size

    def commit(
        self, expected_id: str | None = None, *, stored_sha256: bytes | None = None
    ) -> BlobInfo:
        self._owner.committed += 1
        return self._inner.commit(expected_id, stored_sha256=stored_sha256)

    def abort(self) -> None:
        self._inner.abort()
        self._owner.closed.set()


class WatchedStorage(MemoryStorage):
    """Memory storage that reports when a blob writer closes, and whether it committed."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = threading.Event()
        self.committed = 0
        self.written = 0

    def blob_writer(self, *, encoded: bool = False) -> BlobWriter:
        return _WatchedWriter(super().blob_writer(encoded=encoded), self)


async def test_truncated_put_leaves_nothing(make_service: ServiceFactory) -> None:
    storage = WatchedStorage()
    service = await make_service(storage)
    _, writer = await asyncio.open_connection(service.client.host, service.client.port)
    writer.write(
        f"PUT {ENTRY} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {service.write_token}\r\n"
        "Content-Length: 900000\r\n\r\n".encode()
        + os.urandom(600_000)
    )
    await writer.drain()
    for _ in range(200):  # part of the body is in the blob writer: now the client dies
        if storage.written:
            break
        await asyncio.sleep(0.02)
    writer.close()
    await writer.wait_closed()
    assert await asyncio.to_thread(storage.closed.wait, 10), "the upload was never closed"
    assert storage.written > 0 and storage.committed == 0
    assert (await service.client.get(ENTRY)).status == 404
    assert await records(service) == []
    assert [blob async for blob in storage.blob_ids()] == []


class FlakyStorage(MemoryStorage):
    """Memory storage whose cache objects become unreachable on demand."""

    down = False
    prefix = "caches/"  # "": every object, cache settings too

    def _check(self, key: str) -> None:
        if self.down and key.startswith(self.prefix):
            raise StorageUnavailable("connection refused")

    async def get(self, key: str) -> bytes | None:
        self._check(key)
        return await super().get(key)

    async def put(self, key: str, data: bytes) -> None:
        self._check(key)
        await super().put(key, data)

    async def keys(self, prefix: str) -> AsyncIterator[str]:
        self._check(prefix)
        async for key in super().keys(prefix):
            yield key

    async def list_level(self, prefix: str, *, limit: int) -> AsyncIterator[LevelEntry]:
        self._check(prefix)
        async for entry in super().list_level(prefix, limit=limit):
            yield entry


async def test_unreachable_storage_is_503_and_leaves_no_entry(make_service: ServiceFactory) -> None:
    storage = FlakyStorage()
    service = await make_service(storage)
    storage.down = True
    resp = await service.client.get(ENTRY)
    assert resp.status == 503 and resp.headers["Retry-After"].isdigit()
    assert (await service.client.put(ENTRY, data=b"x", headers=service.auth())).status == 503
    resp = await service.client.request("PROPFIND", "/main/sccache/", headers={"Depth": "1"})
    assert resp.status == 503
    storage.down = False
    assert (await service.client.get(ENTRY)).status == 404


async def test_a_probe_during_a_storage_outage_makes_sccache_read_only_not_fail(
    make_service: ServiceFactory,
) -> None:
    """A probe GET other than 200/404 stops sccache's server and fails the build."""
    storage = FlakyStorage()
    # Settings looked up again on every request: the outage meets their read too.
    service = await make_service(storage, refresh_interval=0)
    for prefix in ("caches/", ""):  # the cache's objects, then the cache's settings too
        storage.down, storage.prefix = True, prefix
        resp = await service.client.get(PROBE)
        assert resp.status == 404 and "storage is unavailable" in await resp.text()
        resp = await service.client.put(PROBE, data=b"Hello, World!", headers=service.auth())
        assert resp.status == 403 and "read-only" in await resp.text(), prefix
        assert (await service.client.get(ENTRY)).status == 503  # lookups say what happened
        storage.down = False
        resp = await service.client.put(PROBE, data=b"Hello, World!", headers=service.auth())
        assert resp.status == 201


@pytest.mark.parametrize(
    ("prefix", "why"),
    [
        ("team~ci", "invalid path segment"),
        ("team%20ci", "invalid path segment"),
        ("/".join(f"s{i}" for i in range(29)), "at most 32 segments"),  # probe fits, entries not
        ("p" * 200 + "/" + "q" * 250, "chars"),
    ],
)
async def test_a_key_prefix_that_can_hold_no_entry_makes_sccache_read_only_not_fail(
    service: Service, prefix: str, why: str
) -> None:
    probe = f"/main/sccache/{prefix}/.sccache_check"
    resp = await service.client.get(probe)
    assert resp.status == 404, await resp.text()
    resp = await service.client.put(probe, data=b"Hello, World!", headers=service.auth())
    text = await resp.text()
    assert resp.status == 403 and why in text and "read-only" in text, text
    assert await records(service) == []
    entry = f"/main/sccache/{prefix}/1/b/b/{ENTRY.rsplit('/', 1)[1]}"
    assert (await service.client.get(entry)).status == 400  # lookups: refused as before
    # The deepest prefix whose entries fit is taken.
    deepest = "/".join(f"s{i}" for i in range(28))
    probe = f"/main/sccache/{deepest}/.sccache_check"
    resp = await service.client.put(probe, data=b"Hello, World!", headers=service.auth())
    assert resp.status == 201, await resp.text()


async def test_a_token_given_as_the_user_name_is_refused_saying_where_it_goes(
    service: Service,
) -> None:
    """``SCCACHE_WEBDAV_USERNAME=<token>`` with no password sends Basic ``token:``; the answer
    said "use Bearer or Basic", though it was Basic."""
    import base64

    basic = base64.b64encode(f"{service.write_token}:".encode()).decode()
    resp = await service.client.put(ENTRY, data=b"x", headers={"Authorization": f"Basic {basic}"})
    assert resp.status == 401
    assert "the token is the password" in await resp.text()
    assert (await service.client.get(ENTRY)).status == 404  # nothing stored
