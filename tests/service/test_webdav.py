"""The sccache WebDAV routes: entries, virtual collections, PROPFIND, auth, limits."""

from __future__ import annotations

import asyncio
import os
import xml.etree.ElementTree as ET

import pytest

from larder.protocol.tokens import Scope
from larder.service import state
from tests.service.conftest import Service, ServiceFactory

DAV = "{DAV:}"
ENTRY = "/main/sccache/1/b/b/1bb32ec483cb7f0389a28c868e53b94fa0bac2c17a3a1133803c5794f3e20586"


async def records(service: Service) -> list[str]:
    return [key async for key in service.storage.keys("caches/main/sccache/")]


async def test_probe_then_put_get_head_delete(service: Service) -> None:
    probe = "/main/sccache/.sccache_check"
    assert (await service.client.get(probe)).status == 404
    resp = await service.client.put(probe, data=b"Hello, World!", headers=service.auth())
    assert resp.status == 201
    assert await (await service.client.get(probe)).read() == b"Hello, World!"

    body = os.urandom(200_000)
    assert (await service.client.put(ENTRY, data=body, headers=service.auth())).status == 201
    resp = await service.client.get(ENTRY)
    assert resp.status == 200 and await resp.read() == body
    head = await service.client.head(ENTRY)
    assert head.status == 200 and head.content_length == len(body)
    assert (await service.client.delete(ENTRY, headers=service.auth())).status == 204
    assert (await service.client.get(ENTRY)).status == 404
    assert (await service.client.delete(ENTRY, headers=service.auth())).status == 404


async def test_double_slashes_are_collapsed(service: Service) -> None:
    resp = await service.client.put("/main/sccache//a//b/entry", data=b"x", headers=service.auth())
    assert resp.status == 201
    assert await (await service.client.get("/main/sccache/a/b/entry")).read() == b"x"


def parse(xml: bytes) -> list[tuple[str, bool, str | None]]:
    root = ET.fromstring(xml)
    assert root.tag == f"{DAV}multistatus"
    found = []
    for response in root.findall(f"{DAV}response"):
        href = response.findtext(f"{DAV}href") or ""
        prop = response.find(f"{DAV}propstat/{DAV}prop")
        assert prop is not None
        assert prop.findtext(f"{DAV}getlastmodified")
        is_collection = prop.find(f"{DAV}resourcetype/{DAV}collection") is not None
        found.append((href, is_collection, prop.findtext(f"{DAV}getcontentlength")))
    return found


async def propfind(service: Service, path: str, depth: str) -> tuple[int, bytes]:
    resp = await service.client.request("PROPFIND", path, headers={"Depth": depth})
    return resp.status, await resp.read()


async def test_propfind_depth_0_and_1(service: Service) -> None:
    status, body = await propfind(service, "/main/sccache/1/b/b/", "0")
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
    assert parse(body)[1] == (ENTRY, False, "5")
    assert (await propfind(service, "/main/sccache/missing-entry", "0"))[0] == 404
    assert (await propfind(service, "/main/sccache/", "infinity"))[0] == 403


async def test_mkcol(service: Service) -> None:
    mkcol = service.client.request
    assert (await mkcol("MKCOL", "/main/sccache/a/b/", headers=service.auth())).status == 201
    await service.client.put("/main/sccache/a/file", data=b"x", headers=service.auth())
    assert (await mkcol("MKCOL", "/main/sccache/a/file/", headers=service.auth())).status == 405
    assert (await mkcol("MKCOL", "/main/sccache/a/b/")).status == 401
    assert await records(service) == ["caches/main/sccache/a/file"]


async def test_auth(service: Service, make_service: ServiceFactory) -> None:
    reader = await service.issue("main", Scope.READ)
    for headers, status in (({}, 401), (service.auth(reader), 403), (service.basic(), 201)):
        resp = await service.client.put(ENTRY, data=b"x", headers=headers)
        assert resp.status == status, headers
        delete = await service.client.delete(ENTRY, headers=headers)
        assert delete.status == (204 if status == 201 else status)
    await service.client.app[state.CACHES].create("secret", private=True)
    path = "/secret/sccache/.sccache_check"
    assert (await service.client.get(path)).status == 401
    assert (await service.client.get(path, headers=service.auth())).status == 403
    assert (await service.client.request("PROPFIND", "/secret/sccache/")).status == 401


@pytest.mark.parametrize(
    "target",
    [
        "/main/sccache/../../config/token-secret",
        "/main/sccache/a/%2e%2e/%2e%2e/%2e%2e/x",
        "/main/sccache/a/./b",
        "/main/sccache/a%00b",
        "/main/sccache/a%5cb",
        "/main/sccache/" + "a/" * 20 + "x",
    ],
)
async def test_traversal_and_bad_paths_store_nothing(service: Service, target: str) -> None:
    host, port = service.client.host, service.client.port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"PUT {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Authorization: Bearer {service.write_token}\r\nContent-Length: 1\r\n\r\nx".encode()
    )
    await writer.drain()
    status = (await asyncio.wait_for(reader.readline(), 5)).split()[1]
    writer.close()
    assert status == b"400", target
    assert [key async for key in service.storage.keys("")] == [
        key async for key in service.storage.keys("config/")
    ]


async def test_oversize_and_truncated_puts_leave_nothing(make_service: ServiceFactory) -> None:
    service = await make_service(max_upload_size=1000)
    resp = await service.client.put(ENTRY, data=os.urandom(5000), headers=service.auth())
    assert resp.status == 413
    host, port = service.client.host, service.client.port
    _, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"PUT {ENTRY} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {service.write_token}\r\n"
        "Content-Length: 900\r\n\r\n".encode()
        + b"x" * 300
    )
    await writer.drain()
    writer.close()
    await asyncio.sleep(0.3)
    assert (await service.client.get(ENTRY)).status == 404
    assert await records(service) == []
    assert [b async for b in service.storage.blob_ids()] == []
