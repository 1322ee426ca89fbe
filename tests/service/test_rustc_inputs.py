"""Key inputs documents beside rustc manifests, nearest keys per crate, explained misses."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from larder.core import keys
from larder.protocol.inputs import MAX_INPUTS_SIZE, Identity
from larder.protocol.tokens import Scope
from larder.service import state
from tests.service.conftest import Service, send_raw
from tests.service.test_rustc_routes import blob_id, manifest_for, upload

KEY = "ab" * 32
OTHER = "cd" * 32
IDENTITY = Identity("leaf", "leaf", "0.1.0", "lib", "x86_64-unknown-linux-gnu")
QUERY = "&".join(f"{name}={value}" for name, value in IDENTITY.as_dict().items())


def document(identity: Identity = IDENTITY, **inputs: Any) -> dict[str, Any]:
    fields = {"format": "larder-rustc/1", "args": ["--crate-name=leaf"], **inputs}
    return {"version": 1, "identity": identity.as_dict(), "inputs": fields}


async def store_manifest(service: Service, key: str, cache: str = "main") -> None:
    files = {f"lib{key[:4]}.rlib": key.encode()}
    await upload(service, files)
    resp = await service.client.put(
        f"/{cache}/rustc/manifests/{key}", data=manifest_for(files), headers=service.auth()
    )
    assert resp.status == 200, await resp.text()


async def nearest(service: Service, query: str = QUERY, cache: str = "main") -> list[str]:
    resp = await service.client.get(f"/{cache}/rustc/inputs?{query}")
    assert resp.status == 200, await resp.text()
    return [item["key"] for item in (await resp.json())["keys"]]


async def test_inputs_round_trip_and_nearest_keys(service: Service) -> None:
    assert await nearest(service) == []
    for key, source in ((KEY, "one"), (OTHER, "two")):
        await store_manifest(service, key)
        body = document(sources=[["src/lib.rs", source]])
        resp = await service.client.put(
            f"/main/rustc/inputs/{key}", json=body, headers=service.auth()
        )
        assert resp.status == 200, await resp.text()
    resp = await service.client.get(f"/main/rustc/inputs/{OTHER}")
    assert resp.status == 200
    assert (await resp.json())["inputs"]["sources"] == [["src/lib.rs", "two"]]
    assert sorted(await nearest(service)) == sorted([KEY, OTHER])
    # Stored compressed, with the identity's index entry.
    stored = await service.storage.get(keys.rustc_inputs("main", KEY))
    assert stored is not None and b"src/lib.rs" not in stored
    assert await service.storage.get(keys.rustc_crate("main", IDENTITY.id(), KEY)) == b""
    # Another crate identity has none.
    other = QUERY.replace("version=0.1.0", "version=0.2.0")
    assert await nearest(service, other) == []
    assert (await service.client.get(f"/main/rustc/inputs/{'ef' * 32}")).status == 404


async def test_a_key_stored_again_for_another_crate_leaves_the_first_ones_index(
    service: Service,
) -> None:
    await store_manifest(service, KEY)
    other = Identity("leaf", "leaf", "0.2.0", "lib", "x86_64-unknown-linux-gnu")
    for identity in (IDENTITY, other):
        resp = await service.client.put(
            f"/main/rustc/inputs/{KEY}", json=document(identity), headers=service.auth()
        )
        assert resp.status == 200, await resp.text()
    assert await nearest(service) == []
    assert await nearest(service, QUERY.replace("version=0.1.0", "version=0.2.0")) == [KEY]
    assert await service.storage.get(keys.rustc_crate("main", IDENTITY.id(), KEY)) is None
    assert await service.storage.get(keys.rustc_crate("main", other.id(), KEY)) == b""


async def test_inputs_need_the_manifest_of_their_key(service: Service) -> None:
    resp = await service.client.put(
        f"/main/rustc/inputs/{KEY}", json=document(), headers=service.auth()
    )
    assert resp.status == 400
    assert "no manifest" in await resp.text()
    assert [k async for k in service.storage.keys("caches/")] == []


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"nope", 400, "not JSON"),
        (b"[" * 100_000, 400, "not JSON"),
        (json.dumps({"version": 2}).encode(), 400, "version"),
        (json.dumps({**document(), "inputs": []}).encode(), 400, "'inputs'"),
        (json.dumps({**document(), "inputs": {"format": 1}}).encode(), 400, "format"),
        (json.dumps({**document(), "inputs": {"format": "x", "A-B": 1}}).encode(), 400, "field"),
        (json.dumps(document(IDENTITY._replace(crate="../../config"))).encode(), 400, "crate"),
        (json.dumps(document(IDENTITY._replace(version=".."))).encode(), 400, "version"),
        (json.dumps(document(IDENTITY._replace(target="a/b"))).encode(), 400, "target"),
        (json.dumps(document(sources=["x" * MAX_INPUTS_SIZE])).encode(), 413, ""),
    ],
)  # fmt: skip
async def test_bad_documents_are_refused_and_change_nothing(
    service: Service, body: bytes, status: int, message: str
) -> None:
    await store_manifest(service, KEY)
    before = [k async for k in service.storage.keys("caches/")]
    resp = await service.client.put(
        f"/main/rustc/inputs/{KEY}", data=io.BytesIO(body), headers=service.auth()
    )
    assert resp.status == status
    assert message in await resp.text()
    assert [k async for k in service.storage.keys("caches/")] == before


async def test_bad_keys_and_identities(service: Service) -> None:
    resp = await service.client.put(
        "/main/rustc/inputs/" + "A" * 64, json=document(), headers=service.auth()
    )
    assert resp.status == 400
    assert (await service.client.get("/main/rustc/inputs/" + "A" * 64)).status == 404
    for query in (
        QUERY.replace("crate=leaf", "crate=..%2F..%2Fconfig"),
        QUERY.replace("&target=x86_64-unknown-linux-gnu", ""),
        QUERY.replace("crate_type=lib", "crate_type=lib%2F.."),
    ):
        resp = await service.client.get(f"/main/rustc/inputs?{query}")
        assert resp.status == 400, query


async def test_inputs_follow_the_cache_rules(service: Service) -> None:
    await store_manifest(service, KEY)
    reader = await service.issue("main", Scope.READ)
    for headers, status in (({}, 401), (service.auth(reader), 403)):
        resp = await service.client.put(
            f"/main/rustc/inputs/{KEY}", json=document(), headers=headers
        )
        assert resp.status == status
    resp = await service.client.put(
        f"/main/rustc/inputs/{KEY}", json=document(), headers=service.auth()
    )
    assert resp.status == 200
    # A private cache: its reader reads its own inputs, not another cache's with its token.
    await service.client.app[state.CACHES].create("secret", private=True)
    secret_writer = await service.issue("secret", Scope.WRITE)
    data = b"secret"
    resp = await service.client.put(
        f"/secret/rustc/blobs/{blob_id(data)}", data=data, headers=service.auth(secret_writer)
    )
    assert resp.status == 200
    resp = await service.client.put(
        f"/secret/rustc/manifests/{OTHER}",
        data=manifest_for({"libsecret.rlib": b"secret"}),
        headers=service.auth(secret_writer),
    )
    assert resp.status == 200
    resp = await service.client.put(
        f"/secret/rustc/inputs/{OTHER}", json=document(), headers=service.auth(secret_writer)
    )
    assert resp.status == 200
    path = f"/secret/rustc/inputs/{OTHER}"
    assert (await service.client.get(path)).status == 401
    assert (await service.client.get(path, headers=service.auth(reader))).status == 403
    secret_reader = await service.issue("secret", Scope.READ)
    assert (await service.client.get(path, headers=service.auth(secret_reader))).status == 200
    listing = f"/secret/rustc/inputs?{QUERY}"
    assert (await service.client.get(listing, headers=service.auth(reader))).status == 403
    resp = await service.client.get(listing, headers=service.auth(secret_reader))
    assert [item["key"] for item in (await resp.json())["keys"]] == [OTHER]
    # The main cache's listing does not see the secret cache's key.
    assert await nearest(service) == [KEY]


async def test_explained_misses_are_counted_by_category(service: Service) -> None:
    for crate, category in (("leaf", "source"), ("leaf", "source"), ("demo", "dependency")):
        resp = await service.client.post(
            "/main/rustc/explained", json={"crate": crate, "category": category}
        )
        assert resp.status == 204, await resp.text()
        # The miss itself, as the manifest lookup counts it.
        await service.client.get(f"/main/rustc/manifests/{KEY}", headers={"X-Larder-Crate": crate})
    for body in ({"crate": "leaf", "category": "leaf.rs"}, {"crate": "../x", "category": "env"}):
        resp = await service.client.post("/main/rustc/explained", json=body)
        assert resp.status == 400
    stats = await (await service.client.get("/api/v1/caches/main/stats")).json()
    assert stats["rustc_misses_by_category"] == {"dependency": 1, "source": 2}
    assert stats["top_missed_crates"] == [
        {"crate": "leaf", "misses": 2, "reason": "source"},
        {"crate": "demo", "misses": 1, "reason": "dependency"},
    ]
    text = await (await service.client.get("/metrics")).text()
    assert 'larder_rustc_miss_reasons_total{cache="main",category="source"} 2.0' in text
    assert 'larder_rustc_miss_reasons_total{cache="main",category="never_built"} 0.0' in text


@pytest.mark.parametrize(
    "target",
    [
        "/main/rustc/inputs/../../config/token-secret",
        "/main/rustc/inputs/..%2f..%2f" + "a" * 58,
        "/main/rustc/inputs/" + "a" * 64 + "/../x",
    ],
)
async def test_traversal_on_inputs_stores_nothing(service: Service, target: str) -> None:
    body = json.dumps(document()).encode()
    head = (
        f"PUT {target} HTTP/1.1\r\nAuthorization: Bearer {service.write_token}\r\n"
        f"Content-Length: {len(body)}\r\n"
    )
    status = await send_raw(service, head, body)
    assert status in (400, 404), status
    assert [k async for k in service.storage.keys("caches/")] == []
