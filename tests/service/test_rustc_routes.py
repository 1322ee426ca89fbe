"""The rustc artifact API: blobs verified by BLAKE3, manifests only over held blobs."""

from __future__ import annotations

import asyncio
import json
import os

import blake3
import pytest
import zstandard

from larder.protocol.rustc import Manifest, Output
from larder.protocol.tokens import Scope
from larder.service import state
from tests.service.conftest import Service, send_raw

KEY = "ab" * 32


def blob_id(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def manifest_for(files: dict[str, bytes], stderr: str = "") -> bytes:
    outputs = tuple(Output(name, blob_id(data), len(data), 0o644) for name, data in files.items())
    return Manifest(crate="leaf", outputs=outputs, stderr=stderr).to_json()


async def upload(service: Service, files: dict[str, bytes], token: str | None = None) -> None:
    for data in files.values():
        resp = await service.client.put(
            f"/main/rustc/blobs/{blob_id(data)}", data=data, headers=service.auth(token)
        )
        assert resp.status == 200, await resp.text()


async def missing(service: Service, ids: list[str], token: str | None = None) -> list[str]:
    resp = await service.client.post(
        "/main/rustc/missing", json={"blobs": ids}, headers=service.auth(token)
    )
    assert resp.status == 200, await resp.text()
    return list((await resp.json())["missing"])


async def test_round_trip_with_dedup(service: Service) -> None:
    files = {"libleaf-1.rlib": os.urandom(300_000), "leaf-1.d": b"deps\n"}
    ids = [blob_id(data) for data in files.values()]
    assert await missing(service, ids) == ids
    await upload(service, files)
    assert await missing(service, [*ids, "cd" * 32]) == ["cd" * 32]

    assert (await service.client.get(f"/main/rustc/manifests/{KEY}")).status == 404
    document = manifest_for(files, stderr="warning: unused\n")
    resp = await service.client.put(
        f"/main/rustc/manifests/{KEY}", data=document, headers=service.auth()
    )
    assert resp.status == 200, await resp.text()
    resp = await service.client.get(f"/main/rustc/manifests/{KEY}")
    assert resp.status == 200
    served = await resp.json()
    assert served["stderr"] == "warning: unused\n"
    assert {o["name"]: o["blake3"] for o in served["outputs"]} == {
        name: blob_id(data) for name, data in files.items()
    }
    for data in files.values():
        resp = await service.client.get(f"/main/rustc/blobs/{blob_id(data)}")
        assert resp.status == 200 and resp.content_type == "application/zstd"
        assert zstandard.ZstdDecompressor().decompressobj().decompress(await resp.read()) == data
    before = [b async for b in service.storage.blob_ids()]
    await upload(service, files)  # the same bytes again: stored once
    assert [b async for b in service.storage.blob_ids()] == before


async def test_blob_must_hash_to_its_name(service: Service) -> None:
    data = b"the real rlib"
    resp = await service.client.put(
        f"/main/rustc/blobs/{blob_id(b'something else')}", data=data, headers=service.auth()
    )
    assert resp.status == 400
    assert "content hash mismatch" in await resp.text()
    assert [b async for b in service.storage.blob_ids()] == []
    assert await missing(service, [blob_id(data)]) == [blob_id(data)]


async def test_manifest_needs_every_blob_held_by_this_cache(service: Service) -> None:
    files = {"liba.rlib": b"a" * 1000, "liba.rmeta": b"m" * 10}
    await upload(service, {"liba.rlib": files["liba.rlib"]})
    resp = await service.client.put(
        f"/main/rustc/manifests/{KEY}", data=manifest_for(files), headers=service.auth()
    )
    assert resp.status == 400
    assert "liba.rmeta" in await resp.text()
    assert (await service.client.get(f"/main/rustc/manifests/{KEY}")).status == 404

    # Another cache holding the bytes does not make them this cache's.
    await service.client.app[state.CACHES].ensure("other")
    other_token = await service.issue("other", Scope.WRITE)
    resp = await service.client.put(
        f"/other/rustc/blobs/{blob_id(files['liba.rmeta'])}",
        data=files["liba.rmeta"],
        headers=service.auth(other_token),
    )
    assert resp.status == 200
    assert await missing(service, [blob_id(files["liba.rmeta"])]) == [blob_id(files["liba.rmeta"])]
    assert (
        await service.client.get(f"/main/rustc/blobs/{blob_id(files['liba.rmeta'])}")
    ).status == 404


async def test_manifest_sizes_must_match(service: Service) -> None:
    data = b"x" * 100
    await upload(service, {"libx.rlib": data})
    lying = Manifest("x", (Output("libx.rlib", blob_id(data), 99, 0o644),)).to_json()
    resp = await service.client.put(
        f"/main/rustc/manifests/{KEY}", data=lying, headers=service.auth()
    )
    assert resp.status == 400 and "99 bytes" in await resp.text()


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (b"not json", "not JSON"),
        (b"[]", "JSON object"),
        (json.dumps({"version": 3}).encode(), "version"),
        (
            json.dumps(
                {"version": 1, "crate": "a", "outputs": [], "stdout": "", "stderr": "",
                 "exit_code": 0}
            ).encode(),
            "1 to 64 outputs",
        ),
        (
            json.dumps(
                {"version": 1, "crate": "a", "stdout": "", "stderr": "", "exit_code": 0,
                 "outputs": [{"name": "../x", "blake3": "a" * 64, "size": 1, "mode": 420}]}
            ).encode(),
            "invalid output file name",
        ),
        (
            json.dumps(
                {"version": 1, "crate": "a", "stdout": "", "stderr": "", "exit_code": 1,
                 "outputs": [{"name": "x", "blake3": "a" * 64, "size": 1, "mode": 420}]}
            ).encode(),
            "exit_code 0",
        ),
    ],
)  # fmt: skip
async def test_malformed_manifests_are_refused(
    service: Service, document: bytes, message: str
) -> None:
    resp = await service.client.put(
        f"/main/rustc/manifests/{KEY}", data=document, headers=service.auth()
    )
    assert resp.status == 400
    assert message in await resp.text()
    assert [k async for k in service.storage.keys("caches/main/rustc/")] == []


async def test_writes_need_a_write_token(service: Service) -> None:
    data = b"bytes"
    reader = await service.issue("main", Scope.READ)
    for headers, status in (({}, 401), (service.auth(reader), 403)):
        put = await service.client.put(
            f"/main/rustc/blobs/{blob_id(data)}", data=data, headers=headers
        )
        assert put.status == status
        post = await service.client.post("/main/rustc/missing", json={"blobs": []}, headers=headers)
        assert post.status == status
        manifest = await service.client.put(
            f"/main/rustc/manifests/{KEY}", data=b"{}", headers=headers
        )
        assert manifest.status == status
    assert [b async for b in service.storage.blob_ids()] == []


async def test_bad_keys_and_queries(service: Service) -> None:
    for path in ("/main/rustc/manifests/ABC", "/main/rustc/blobs/" + "g" * 64):
        assert (await service.client.get(path)).status == 404
    resp = await service.client.put(
        "/main/rustc/manifests/" + "A" * 64, data=b"{}", headers=service.auth()
    )
    assert resp.status == 400
    for body in ({"blobs": ["nothex"]}, {"blobs": "x"}, {"blobs": ["a" * 64] * 10_001}):
        resp = await service.client.post("/main/rustc/missing", json=body, headers=service.auth())
        assert resp.status == 400, body


async def test_private_cache_reads_need_a_token(service: Service) -> None:
    registry = service.client.app[state.CACHES]
    await registry.create("secret", private=True)
    path = f"/secret/rustc/manifests/{KEY}"
    assert (await service.client.get(path)).status == 401
    assert (await service.client.get(path, headers=service.auth())).status == 403
    reader = await service.issue("secret", Scope.READ)
    assert (await service.client.get(path, headers=service.auth(reader))).status == 404


async def test_direct_entries_round_trip(service: Service) -> None:
    path = f"/main/rustc/direct/{KEY}"
    assert (await service.client.get(path)).status == 404
    first = {"sources": ["src/lib.rs", "@LARDER:TARGET@/debug/build/x/out/gen.rs"], "env": ["X"]}
    second = {"sources": ["src/lib.rs", "src/more.rs"], "env": []}
    linked = {"sources": ["src/main.rs"], "env": [], "link": ["cc", "-m64", "-lc"]}
    for entry in (first, second, first, linked):  # the same entry twice is kept once
        resp = await service.client.put(path, json=entry, headers=service.auth())
        assert resp.status == 200, await resp.text()
    resp = await service.client.get(path)
    assert resp.status == 200
    entries = (await resp.json())["entries"]
    assert len(entries) == 3
    assert first in entries and second in entries and linked in entries


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (b"nope", "not JSON"),
        (json.dumps({"sources": "src/lib.rs", "env": []}).encode(), "sources"),
        (json.dumps({"sources": ["a\u0000b"], "env": []}).encode(), "NUL"),
        (json.dumps({"sources": [], "env": ["NOT-A-NAME"]}).encode(), "variable name"),
        (json.dumps({"sources": [], "env": [], "link": "cc -lc"}).encode(), "'link'"),
        (json.dumps({"sources": [], "env": [], "link": ["cc", ""]}).encode(), "link tokens"),
    ],
)
async def test_malformed_direct_entries_are_refused(
    service: Service, entry: bytes, message: str
) -> None:
    resp = await service.client.put(f"/main/rustc/direct/{KEY}", data=entry, headers=service.auth())
    assert resp.status == 400
    assert message in await resp.text()
    assert (await service.client.get(f"/main/rustc/direct/{KEY}")).status == 404


async def test_direct_entries_need_a_write_token(service: Service) -> None:
    reader = await service.issue("main", Scope.READ)
    body = {"sources": [], "env": []}
    for headers, status in (({}, 401), (service.auth(reader), 403)):
        resp = await service.client.put(f"/main/rustc/direct/{KEY}", json=body, headers=headers)
        assert resp.status == status


@pytest.mark.parametrize(
    "target",
    [
        "/main/rustc/blobs/../../config/token-secret",
        "/main/rustc/blobs/%2e%2e%2f%2e%2e%2fconfig",
        "/main/rustc/manifests/..%2f..%2f" + "a" * 58,
        "/main/rustc/manifests/" + "a" * 63 + "%00",
        "/main/rustc/direct/" + "A" * 64,
        "/main/rustc/direct/" + "a" * 64 + "/../x",
        "/main/rustc/missing/../blobs/" + "a" * 64,
    ],
)
async def test_traversal_on_rustc_routes_stores_nothing(service: Service, target: str) -> None:
    head = (
        f"PUT {target} HTTP/1.1\r\nAuthorization: Bearer {service.write_token}\r\n"
        "Content-Length: 2\r\n"
    )
    status = await send_raw(service, head, b"{}")
    assert status == 400, status
    assert [k async for k in service.storage.keys("caches/")] == []
    assert [b async for b in service.storage.blob_ids()] == []


async def test_expect_continue_on_posts_waits_for_the_access_check(service: Service) -> None:
    """A POST of the rustc API is refused before its body, as a PUT is: ``missing`` (asked
    before uploading) needs a write token, ``explained`` a read token."""
    await service.client.app[state.CACHES].create("priv", private=True)
    reader_token, _ = await service.client.app[state.TOKENS].issue("priv", Scope.READ, 3600)
    writer_token, _ = await service.client.app[state.TOKENS].issue("priv", Scope.WRITE, 3600)
    for route, needed in (("missing", writer_token), ("explained", reader_token)):
        for headers, status in (
            ("", b"401"),
            (f"Authorization: Bearer {service.write_token}\r\n", b"403"),  # main's token
            (f"Authorization: Bearer {needed}\r\n", b"100"),
            *(
                [(f"Authorization: Bearer {reader_token}\r\n", b"403")]
                if route == "missing"
                else []
            ),
        ):
            reader, writer = await asyncio.open_connection(service.client.host, service.client.port)
            writer.write(
                f"POST /priv/rustc/{route} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                f"Content-Length: 10\r\n{headers}\r\n".encode()
            )
            line = await asyncio.wait_for(reader.readline(), 5)
            writer.close()
            assert line.split()[1] == status, (route, line)
