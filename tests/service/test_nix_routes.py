"""The Nix binary-cache routes through a real aiohttp server on memory storage."""

from __future__ import annotations

import asyncio
import bz2
import dataclasses
import hashlib
import lzma
import os

import pytest
import zstandard

from larder.core import keys
from larder.protocol import narinfo, nix32
from larder.protocol.content_address import store_hash_of
from larder.protocol.nar import write_nar
from larder.protocol.signing import PublicKey, SecretKey
from larder.protocol.tokens import Scope
from larder.service import state
from tests.service.conftest import Service, ServiceFactory, send_raw

STORE = "/nix/store"
COMPRESSORS = {
    "": lambda data: data,
    ".xz": lzma.compress,
    ".bz2": bz2.compress,
    ".zst": lambda data: zstandard.ZstdCompressor().compress(data),
}


def make_nar(payload: bytes) -> bytes:
    return write_nar({"type": "regular", "contents": payload, "executable": False})


def store_path(name: str, seed: str | None = None) -> str:
    digest = hashlib.sha256((seed or name).encode()).digest()[:20]
    return f"{STORE}/{nix32.encode(digest)}-{name}"


def nar_url(data: bytes, ext: str = ".xz") -> str:
    return f"nar/{nix32.encode(hashlib.sha256(data).digest())}.nar{ext}"


def narinfo_text(path: str, nar: bytes, references: list[str] = (), **override: str) -> bytes:  # type: ignore[assignment]
    fields = {
        "StorePath": path,
        "URL": "nar/whatever.nar.xz",
        "Compression": "xz",
        "NarHash": "sha256:" + nix32.encode(hashlib.sha256(nar).digest()),
        "NarSize": str(len(nar)),
        "References": " ".join(os.path.basename(r) for r in references),
    }
    fields.update(override)
    return "".join(f"{k}: {v}\n" for k, v in fields.items()).encode()


def hash_part(path: str) -> str:
    return os.path.basename(path)[:32]


async def push(
    svc: Service, path: str, nar: bytes, references: list[str] = (), ext: str = ".xz"
) -> None:  # type: ignore[assignment]
    body = COMPRESSORS[ext](nar)
    resp = await svc.client.put(f"/main/{nar_url(body, ext)}", data=body, headers=svc.auth())
    assert resp.status == 200, await resp.text()
    resp = await svc.client.put(
        f"/main/{hash_part(path)}.narinfo",
        data=narinfo_text(path, nar, references),
        headers=svc.auth(),
    )
    assert resp.status == 200, await resp.text()


async def blob_count(svc: Service) -> int:
    return len([blob async for blob in svc.storage.blob_ids()])


async def test_nix_cache_info(service: Service) -> None:
    resp = await service.client.get("/main/nix-cache-info")
    assert resp.status == 200
    text = await resp.text()
    assert text == "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n"


async def test_cache_api_reports_key_and_substituter(service: Service) -> None:
    resp = await service.client.get("/api/v1/caches/main")
    doc = await resp.json()
    assert doc["name"] == "main"
    assert doc["public_key"] == service.main.public_key.to_string()
    assert doc["substituter"].endswith("/main")
    assert (await service.client.get("/api/v1/caches/nope")).status == 404
    # HTTP/1.0 without Host: the address and port the request reached, not the address alone
    reader, writer = await asyncio.open_connection(service.client.host, service.client.port)
    writer.write(b"GET /api/v1/caches/main HTTP/1.0\r\n\r\n")
    reply = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    port = service.client.port
    assert f'"substituter": "http://127.0.0.1:{port}/main"'.encode() in reply, reply


async def test_push_and_fetch_round_trip_signed(service: Service) -> None:
    leaf, app = store_path("rust_leaf-1.0"), store_path("rust_app-1.0")
    leaf_nar, app_nar = make_nar(b"leaf" * 1000), make_nar(os.urandom(200_000))
    await push(service, leaf, leaf_nar)
    await push(service, app, app_nar, [leaf, app])

    resp = await service.client.get(f"/main/{hash_part(app)}.narinfo")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/x-nix-narinfo")
    info = narinfo.parse(await resp.read())
    assert info.compression == "zstd"
    assert info.url.endswith(".nar.zst")
    key = PublicKey.parse(service.main.public_key.to_string())
    assert any(key.verify(narinfo.fingerprint(info), sig) for sig in info.sigs)
    assert sorted(r.base for r in info.references) == sorted(
        os.path.basename(p) for p in (leaf, app)
    )

    nar = await service.client.get(f"/main/{info.url}")
    assert nar.status == 200
    assert nar.headers["Accept-Ranges"] == "bytes"
    stored = await nar.read()
    assert len(stored) == info.file_size
    assert zstandard.ZstdDecompressor().decompressobj().decompress(stored) == app_nar

    plain = await service.client.get(f"/main/{info.url.removesuffix('.zst')}")
    assert plain.status == 200 and await plain.read() == app_nar

    ranged = await service.client.get(f"/main/{info.url}", headers={"Range": "bytes=10-99"})
    assert ranged.status == 206
    assert await ranged.read() == stored[10:100]
    assert ranged.headers["Content-Range"] == f"bytes 10-99/{len(stored)}"
    suffix = await service.client.get(f"/main/{info.url}", headers={"Range": "bytes=-7"})
    assert await suffix.read() == stored[-7:]
    beyond = await service.client.get(
        f"/main/{info.url}", headers={"Range": f"bytes={len(stored)}-"}
    )
    assert beyond.status == 416

    head = await service.client.head(f"/main/{hash_part(app)}.narinfo")
    assert head.status == 200
    assert (await service.client.head(f"/main/{info.url}")).status == 200


async def test_uploader_signatures_are_kept_and_own_key_not_duplicated(service: Service) -> None:
    path = store_path("signed-1.0")
    nar = make_nar(b"x")
    body = lzma.compress(nar)
    await service.client.put(f"/main/{nar_url(body)}", data=body, headers=service.auth())
    ci_sig = "ci-key-1:" + "A" * 86 + "=="
    stale_own = f"{service.main.signing_key.name}:" + "B" * 86 + "=="
    document = narinfo_text(path, nar) + f"Sig: {ci_sig}\nSig: {stale_own}\n".encode()
    resp = await service.client.put(
        f"/main/{hash_part(path)}.narinfo", data=document, headers=service.auth()
    )
    assert resp.status == 200, await resp.text()
    info = narinfo.parse(
        await (await service.client.get(f"/main/{hash_part(path)}.narinfo")).read()
    )
    assert ci_sig in info.sigs
    assert stale_own not in info.sigs
    assert len(info.sigs) == 2


async def test_identical_nar_in_any_compression_is_stored_once(service: Service) -> None:
    nar = make_nar(os.urandom(50_000))
    for ext, compress in COMPRESSORS.items():
        body = compress(nar)
        resp = await service.client.put(
            f"/main/{nar_url(body, ext)}", data=body, headers=service.auth()
        )
        assert resp.status == 200, (ext, await resp.text())
    assert await blob_count(service) == 1


async def test_nar_put_is_idempotent_and_a_narinfo_keeps_its_contents(service: Service) -> None:
    path = store_path("again-1.0")
    nar = make_nar(b"again")
    await push(service, path, nar)
    await push(service, path, nar)
    url = f"/main/{hash_part(path)}.narinfo"
    first = await (await service.client.get(url)).read()
    # Another build of the same path (not reproducible, or forged): answered as stored, and
    # the narinfo served stays the first, as does one renaming the path under its referrers.
    await push(service, path, make_nar(b"another build"))
    renamed = path.replace("again-1.0", "other-2.0")
    await push(service, renamed, nar)
    assert await (await service.client.get(url)).read() == first
    # The same contents with another signature (`nix store sign --store`): the signature joins.
    sig = "ci-key-1:" + "A" * 86 + "=="
    document = narinfo_text(path, nar) + f"Sig: {sig}\n".encode()
    resp = await service.client.put(url, data=document, headers=service.auth())
    assert resp.status == 200, await resp.text()
    served = narinfo.parse(await (await service.client.get(url)).read())
    assert sig in served.sigs and served.nar_hash == narinfo.parse(first).nar_hash
    document = narinfo_text(path, nar) + b"Sig: ci-key-2:" + b"B" * 86 + b"==\n"
    resp = await service.client.put(url, data=document, headers=service.auth())
    assert resp.status == 200, await resp.text()
    served = narinfo.parse(await (await service.client.get(url)).read())
    assert sig in served.sigs and len(served.sigs) == 3  # both uploaders' and the cache's


async def test_a_later_upload_with_other_references_does_not_replace_the_stored_one(
    service: Service,
) -> None:
    """Same NAR and NarHash, but a dependency dropped from References (a pusher's bug, or a
    forged upload): the stored narinfo stays, or the closure a laptop substitutes would lack
    that dependency."""
    dep = store_path("dep-1.0")
    await push(service, dep, make_nar(b"dep"))
    top = store_path("top-1.0")
    nar = make_nar(b"top refers to dep")
    await push(service, top, nar, references=[dep])
    url = f"/main/{hash_part(top)}.narinfo"
    resp = await service.client.put(url, data=narinfo_text(top, nar, []), headers=service.auth())
    assert resp.status == 200, await resp.text()  # answered as stored
    served = narinfo.parse(await (await service.client.get(url)).read())
    assert [ref.full for ref in served.references] == [dep]


async def test_a_later_upload_without_the_ca_does_not_replace_the_stored_one(
    service: Service,
) -> None:
    """A content-addressed path pushed again without its CA (another Nix, another tool): the
    stored narinfo keeps its CA, which lets clients trust the path without a signature."""
    nar = make_nar(b"fixed contents")
    ca = "fixed:r:sha256:" + nix32.encode(hashlib.sha256(nar).digest())
    made = store_hash_of(ca, "src-1.0", [], "")
    path = f"/nix/store/{made}-src-1.0"
    body = lzma.compress(nar)
    await service.client.put(f"/main/{nar_url(body)}", data=body, headers=service.auth())
    url = f"/main/{made}.narinfo"
    for document in (narinfo_text(path, nar, CA=ca), narinfo_text(path, nar)):
        resp = await service.client.put(url, data=document, headers=service.auth())
        assert resp.status == 200, await resp.text()
    served = narinfo.parse(await (await service.client.get(url)).read())
    assert served.ca == ca


async def test_a_later_upload_keeps_the_stored_deriver(service: Service) -> None:
    """`nix store sign` or a second pusher sends the narinfo again without its Deriver: the
    signatures join, and the Deriver (what `nix-store --query --deriver` answers) stays."""
    path = store_path("derived-1.0")
    deriver = store_path("derived-1.0.drv").rsplit("/", 1)[1]
    nar = make_nar(b"derived")
    body = lzma.compress(nar)
    await service.client.put(f"/main/{nar_url(body)}", data=body, headers=service.auth())
    url = f"/main/{hash_part(path)}.narinfo"
    resp = await service.client.put(
        url, data=narinfo_text(path, nar, Deriver=deriver), headers=service.auth()
    )
    assert resp.status == 200, await resp.text()
    sig = "ci-key-1:" + "A" * 86 + "=="
    document = narinfo_text(path, nar) + f"Sig: {sig}\n".encode()
    resp = await service.client.put(url, data=document, headers=service.auth())
    assert resp.status == 200, await resp.text()
    served = narinfo.parse(await (await service.client.get(url)).read())
    assert sig in served.sigs
    assert served.deriver is not None and served.deriver.base == deriver


async def test_signatures_are_bounded(service: Service) -> None:
    """Every reader downloads a narinfo's signatures with each lookup: a writer piling up
    thousands made it too large to read back, and every lookup a 404."""
    path = store_path("sigs-1.0")
    nar = make_nar(b"sigs")
    await push(service, path, nar)
    url = f"/main/{hash_part(path)}.narinfo"

    def signed(*names: str, fill: str = "A") -> bytes:
        lines = "".join(f"Sig: {name}:{fill * 86}==\n" for name in names)
        return narinfo_text(path, nar) + lines.encode()

    keys_ = [f"k{i}" for i in range(33)]
    resp = await service.client.put(url, data=signed(*keys_), headers=service.auth())
    assert resp.status == 400 and "at most 32 signatures" in await resp.text()
    for _ in range(2):  # the same signatures again: nothing added
        resp = await service.client.put(url, data=signed(*keys_[:31]), headers=service.auth())
        assert resp.status == 200, await resp.text()
    resp = await service.client.put(url, data=signed("k31", fill="B"), headers=service.auth())
    assert resp.status == 200, await resp.text()
    served = narinfo.parse(await (await service.client.get(url)).read())
    assert len(served.sigs) == 33  # 32 and the cache's own, made when served
    resp = await service.client.put(url, data=signed("k32"), headers=service.auth())
    assert resp.status == 400
    assert (await service.client.get(url)).status == 200


async def test_a_first_upload_with_too_many_signatures_is_refused(service: Service) -> None:
    """The limit holds for the first upload of a path too, not only when signatures are
    added to a stored one: a narinfo stored with thousands would be downloaded whole by every
    reader with each lookup."""
    path = store_path("first-sigs-1.0")
    nar = make_nar(b"first sigs")
    body = lzma.compress(nar)
    await service.client.put(f"/main/{nar_url(body)}", data=body, headers=service.auth())
    url = f"/main/{hash_part(path)}.narinfo"
    lines = "".join(f"Sig: k{i}:{'A' * 86}==\n" for i in range(33))
    resp = await service.client.put(
        url, data=narinfo_text(path, nar) + lines.encode(), headers=service.auth()
    )
    assert resp.status == 400 and "at most 32 signatures" in await resp.text()
    assert (await service.client.get(url)).status == 404


async def test_signatures_added_later_keep_a_narinfo_within_the_document_limit(
    make_service: ServiceFactory,
) -> None:
    """Each upload within the size limit, but the signatures it adds would make the stored
    narinfo larger than any upload may be: refused, and the stored one stays as it was."""
    service = await make_service(max_document_size=8192)
    path = store_path("long-sigs-1.0")
    nar = make_nar(b"long sigs")
    body = lzma.compress(nar)
    await service.client.put(f"/main/{nar_url(body)}", data=body, headers=service.auth())
    url = f"/main/{hash_part(path)}.narinfo"

    def signed(first: int) -> bytes:  # 15 signatures by keys with 200-character names
        lines = "".join(f"Sig: {'k' * 196}{i:04}:{'A' * 86}==\n" for i in range(first, first + 15))
        return narinfo_text(path, nar) + lines.encode()

    assert len(signed(0)) < 8192 / 2 + 1000  # each upload fits; both together do not
    resp = await service.client.put(url, data=signed(0), headers=service.auth())
    assert resp.status == 200, await resp.text()
    resp = await service.client.put(url, data=signed(15), headers=service.auth())
    assert resp.status == 400 and "8192" in await resp.text()
    served = narinfo.parse(await (await service.client.get(url)).read())
    assert len(served.sigs) == 16  # the first upload's and the cache's own


@pytest.mark.parametrize(
    "credentials", ["Basic é", "Basic " + "é" * 20, "Bearer té", "Basic ", "Basic Og=="]
)
async def test_unusable_credentials_on_a_public_read_are_a_reader(
    service: Service, credentials: str
) -> None:
    """Whether a read's token could write is asked of every lookup: a Basic value that is not
    ASCII made base64 raise what nothing caught (500, a traceback)."""
    path = store_path("public-1.0")
    await push(service, path, make_nar(b"public"))
    for target, status in (
        (f"/main/{hash_part(path)}.narinfo", 200),
        (f"/main/{'0' * 32}.narinfo", 404),
    ):
        for method in ("GET", "HEAD"):
            head = f"{method} {target} HTTP/1.1\r\nAuthorization: {credentials}\r\n"
            assert await send_raw(service, head) == status, (method, target)
    await service.client.app[state.CACHES].update(dataclasses.replace(service.main, private=True))
    head = f"GET /main/{hash_part(path)}.narinfo HTTP/1.1\r\nAuthorization: {credentials}\r\n"
    assert await send_raw(service, head) == 401


async def stored_with(service: Service, name: str, lines: bytes) -> tuple[str, bytes, str]:
    """A path pushed, then ``lines`` added to its stored narinfo (as an older release could
    have stored it): the path, its NAR and the narinfo's key."""
    path = store_path(f"{name}-1.0")
    nar = make_nar(name.encode())
    await push(service, path, nar)
    key = keys.narinfo("main", hash_part(path))
    stored = await service.storage.get(key)
    assert stored is not None
    await service.storage.put(key, stored + lines)
    return path, nar, key


async def test_a_narinfo_stored_with_more_signatures_takes_them_again(service: Service) -> None:
    """Stored before the limit with 40: a second pusher sending it again is not refused."""
    sigs = "".join(f"Sig: k{i}:{'A' * 86}==\n" for i in range(40)).encode()
    path, nar, _ = await stored_with(service, "forty", sigs)
    url = f"/main/{hash_part(path)}.narinfo"
    resp = await service.client.put(
        url, data=narinfo_text(path, nar) + sigs, headers=service.auth()
    )
    assert resp.status == 200, await resp.text()
    resp = await service.client.put(url, data=narinfo_text(path, nar), headers=service.auth())
    assert resp.status == 200, await resp.text()


async def test_a_stored_narinfo_whose_ca_does_not_make_its_path_is_missing(
    service: Service,
) -> None:
    """A narinfo stored before CAs were checked (Nix aborts on it): served as missing, replaced
    by the next upload, and found by verify."""
    from larder.core.verify import verify

    path, nar, key = await stored_with(
        service, "poisoned", b"CA: fixed:r:sha256:" + b"1" * 52 + b"\n"
    )
    url = f"/main/{hash_part(path)}.narinfo"
    service.client.app[state.NIX]._served.forget("main", hash_part(path))
    assert (await service.client.get(url)).status == 404
    report = await verify(service.storage, ["main"])
    assert key in report.damaged_objects
    await push(service, path, nar)
    served = narinfo.parse(await (await service.client.get(url)).read())
    assert served.ca is None


async def test_a_narinfo_whose_nar_is_gone_is_replaced(service: Service) -> None:
    path = store_path("lost-1.0")
    nar = make_nar(b"lost")
    await push(service, path, nar)
    record = keys.nar(service.main.name, nix32.encode(hashlib.sha256(nar).digest()))
    assert await service.storage.delete(record)
    rebuilt = make_nar(b"rebuilt")
    await push(service, path, rebuilt)
    served = narinfo.parse(
        await (await service.client.get(f"/main/{hash_part(path)}.narinfo")).read()
    )
    assert served.nar_hash.digest == hashlib.sha256(rebuilt).digest()


@pytest.mark.parametrize(
    "ca",
    [
        "fixed:r:sha256:" + "1" * 52,  # a digest that does not make this path
        "fixed:r:sha256-" + "A" * 43 + "=",  # SRI, which Nix does not read in a CA
        "fixed:git:md5:" + "1" * 32,
        "text:sha1:" + "1" * 32,
    ],
)
async def test_a_content_address_must_make_the_store_path(service: Service, ca: str) -> None:
    path = store_path("claims-ca-1.0")
    nar = make_nar(b"claims")
    body = lzma.compress(nar)
    await service.client.put(f"/main/{nar_url(body)}", data=body, headers=service.auth())
    document = narinfo_text(path, nar, CA=ca)
    resp = await service.client.put(
        f"/main/{hash_part(path)}.narinfo", data=document, headers=service.auth()
    )
    assert resp.status == 400, await resp.text()
    assert "CA" in await resp.text()
    assert (await service.client.get(f"/main/{hash_part(path)}.narinfo")).status == 404


async def test_a_content_addressed_path_is_stored_with_its_ca(service: Service) -> None:
    nar = make_nar(b"fixed contents")
    digest = hashlib.sha256(nar).digest()
    name = "src-1.0"
    made = store_hash_of("fixed:r:sha256:" + nix32.encode(digest), name, [], "")
    path = f"/nix/store/{made}-{name}"
    ca = "fixed:r:sha256:" + nix32.encode(digest)
    body = lzma.compress(nar)
    await service.client.put(f"/main/{nar_url(body)}", data=body, headers=service.auth())
    resp = await service.client.put(
        f"/main/{made}.narinfo", data=narinfo_text(path, nar, CA=ca), headers=service.auth()
    )
    assert resp.status == 200, await resp.text()
    served = narinfo.parse(await (await service.client.get(f"/main/{made}.narinfo")).read())
    assert served.ca == ca


@pytest.mark.parametrize("ext", sorted(COMPRESSORS))
async def test_nar_file_hash_must_match_name(service: Service, ext: str) -> None:
    """Whichever thread hashes the upload (a kept zstd upload is hashed by its writer)."""
    body = COMPRESSORS[ext](make_nar(b"payload"))
    wrong = nix32.encode(hashlib.sha256(body + b"other").digest())
    resp = await service.client.put(
        f"/main/nar/{wrong}.nar{ext}", data=body, headers=service.auth()
    )
    assert resp.status == 400
    assert "file hash mismatch" in await resp.text() or "NarHash" in await resp.text()
    assert await blob_count(service) == 0
    assert [key async for key in service.storage.keys("caches/")] == []


async def test_malformed_nar_uploads_are_refused_and_store_nothing(service: Service) -> None:
    good = make_nar(b"content" * 100)
    cases = {
        "not a NAR": (b"hello world, not a nar", ""),
        "truncated NAR": (good[:-8], ""),
        "trailing bytes": (good + b"\0" * 8, ""),
        "truncated xz": (lzma.compress(good)[:-10], ".xz"),
        "corrupt zstd": (b"\x28\xb5\x2f\xfd" + b"\xff" * 64, ".zst"),
    }
    for label, (body, ext) in cases.items():
        resp = await service.client.put(
            f"/main/{nar_url(body, ext)}", data=body, headers=service.auth()
        )
        assert resp.status == 400, label
    assert await blob_count(service) == 0
    bad_name = await service.client.put(
        "/main/nar/notahash.nar.xz", data=b"x", headers=service.auth()
    )
    assert bad_name.status == 400
    brotli = await service.client.put(
        f"/main/{nar_url(good, '.br')}", data=good, headers=service.auth()
    )
    assert brotli.status == 400


async def test_narinfo_checks_each_name_the_failed_check(service: Service) -> None:
    path, dep = store_path("checked-1.0"), store_path("missing-dep-1.0")
    nar = make_nar(b"checked")
    body = lzma.compress(nar)
    await service.client.put(f"/main/{nar_url(body)}", data=body, headers=service.auth())
    url = f"/main/{hash_part(path)}.narinfo"
    cases = {
        "does not match the URL": (f"/main/{hash_part(dep)}.narinfo", narinfo_text(path, nar)),
        "no NAR with NarHash": (url, narinfo_text(path, nar + b"x")),
        "NarSize": (url, narinfo_text(path, nar, NarSize=str(len(nar) + 8))),
        "references not in this cache": (url, narinfo_text(path, nar, [dep])),
        "NarHash": (url, narinfo_text(path, nar, NarHash="sha256:zzz")),
        "": (url, narinfo_text(path, nar).replace(b"\n", b"\r\n")),
    }
    for expected, (target, document) in cases.items():
        resp = await service.client.put(target, data=document, headers=service.auth())
        assert resp.status == 400, expected
        assert expected in await resp.text()
    missing_store_path = (
        b"URL: nar/x.nar\nNarHash: sha256:"
        + nix32.encode(hashlib.sha256(nar).digest()).encode()
        + b"\n"
    )
    assert (
        await service.client.put(url, data=missing_store_path, headers=service.auth())
    ).status == 400
    assert (await service.client.get(url)).status == 404
    assert (await service.client.get(f"/main/{hash_part(dep)}.narinfo")).status == 404


async def test_a_reference_must_name_the_path_the_cache_holds(service: Service) -> None:
    """Nix asks for a reference by its hash and refuses a narinfo naming another path: a
    narinfo whose reference is held under another name would never substitute."""
    dep, path = store_path("dep-1.0"), store_path("user-1.0")
    await push(service, dep, make_nar(b"dep"))
    nar = make_nar(b"user")
    body = lzma.compress(nar)
    await service.client.put(f"/main/{nar_url(body)}", data=body, headers=service.auth())
    renamed = dep.replace("-dep-1.0", "-wrongname")
    self_renamed = path.replace("-user-1.0", "-other-name")
    url = f"/main/{hash_part(path)}.narinfo"
    for references, says in (
        ([renamed], f"{renamed.rsplit('/', 1)[1]} (held as {dep.rsplit('/', 1)[1]})"),
        ([dep, self_renamed], f"(this path is {path.rsplit('/', 1)[1]})"),
    ):
        resp = await service.client.put(
            url, data=narinfo_text(path, nar, references), headers=service.auth()
        )
        assert resp.status == 400
        text = await resp.text()
        assert "under another name" in text and says in text, text
        assert (await service.client.get(url)).status == 404
    resp = await service.client.put(url, data=narinfo_text(path, nar, [dep, path]),
                                    headers=service.auth())  # fmt: skip
    assert resp.status == 200, await resp.text()


async def test_writes_need_a_write_token_for_this_cache(service: Service) -> None:
    await service.client.app[state.CACHES].create("other")
    path = store_path("auth-1.0")
    nar = make_nar(b"auth")
    body = lzma.compress(nar)
    url = f"/main/{nar_url(body)}"
    reader = await service.issue("main", Scope.READ)
    other_writer = await service.issue("other", Scope.WRITE)
    expired = await service.issue("main", Scope.WRITE, ttl=-10)
    assert (await service.client.put(url, data=body)).status == 401
    assert (await service.client.put(url, data=body, headers=service.auth("garbage"))).status == 401
    assert (await service.client.put(url, data=body, headers=service.auth(expired))).status == 401
    assert (await service.client.put(url, data=body, headers=service.auth(reader))).status == 403
    assert (
        await service.client.put(url, data=body, headers=service.auth(other_writer))
    ).status == 403
    assert await blob_count(service) == 0
    resp = await service.client.put(url, data=body, headers=service.basic())
    assert resp.status == 200, await resp.text()
    assert (
        await service.client.put(f"/main/{hash_part(path)}.narinfo", data=narinfo_text(path, nar))
    ).status == 401


async def test_revoked_token_is_refused(make_service: ServiceFactory) -> None:
    svc = await make_service(refresh_interval=0.0)
    tokens = svc.client.app[state.TOKENS]
    token, claims = await tokens.issue("main", Scope.WRITE, 3600)
    body = lzma.compress(make_nar(b"r"))
    assert (
        await svc.client.put(f"/main/{nar_url(body)}", data=body, headers=svc.auth(token))
    ).status == 200
    await tokens.revoke(claims.token_id)
    resp = await svc.client.put(f"/main/{nar_url(body)}", data=body, headers=svc.auth(token))
    assert resp.status == 401
    assert "revoked" in await resp.text()


async def test_private_cache_needs_a_read_token(service: Service) -> None:
    await service.client.app[state.CACHES].create("secret", private=True)
    assert (await service.client.get("/secret/nix-cache-info")).status == 401
    main_reader = await service.issue("main", Scope.READ)
    assert (
        await service.client.get("/secret/nix-cache-info", headers=service.auth(main_reader))
    ).status == 403
    reader = await service.issue("secret", Scope.READ)
    assert (
        await service.client.get("/secret/nix-cache-info", headers=service.basic(reader))
    ).status == 200
    assert (await service.client.get("/api/v1/caches/secret")).status == 401


async def raw_request(service: Service, method: str, target: str, body: bytes = b"x") -> int:
    """Send ``target`` byte for byte (no client-side normalisation); return the status."""
    head = (
        f"{method} {target} HTTP/1.1\r\n"
        f"Authorization: Bearer {service.write_token}\r\nContent-Length: {len(body)}\r\n"
    )
    return await send_raw(service, head, body)


async def test_a_method_an_api_route_does_not_take_is_405_with_allow(service: Service) -> None:
    resp = await service.client.post("/api/v1/caches/main", data=b"{}")
    assert resp.status == 405
    assert "GET" in resp.headers["Allow"]
    assert (await resp.json())["code"] == 405


async def test_bad_names_and_traversal_are_refused_and_store_nothing(service: Service) -> None:
    before = [key async for key in service.storage.keys("")]
    attempts = [
        ("GET", "/Main/nix-cache-info", 400),
        ("GET", "/api/nix-cache-info", 404),
        ("GET", "/api/v2/caches/main", 404),
        ("PUT", "/metrics/x", 404),
        ("GET", "/nope/nix-cache-info", 404),
        ("GET", "/main/short.narinfo", 404),
        ("GET", "/main/" + "A" * 32 + ".narinfo", 404),
        ("PUT", "/main/short.narinfo", 400),
        # Sent byte for byte: an HTTP client library would resolve the dot segments itself.
        ("PUT", "/main/../../etc/passwd", 400),
        ("PUT", "/main/%2e%2e/%2e%2e/etc/passwd", 400),
        ("PUT", "/main/log/%2e%2e/%2e%2e/x", 400),
        ("PUT", "/main/log/a%00b", 400),
        ("PUT", "/main/log/a%5cb", 400),
        ("PUT", "/main/log/a%2f..%2f..%2fb", 400),
        ("PUT", "/main/log//x", 400),
        ("PUT", "/main//etc/passwd", 400),
        ("PUT", "//etc/passwd", 404),
        ("GET", "/main/log/%2e%2e/%2e%2e/config/token-secret", 404),
        ("GET", "/main/nar/..%2f..%2fconfig.nar.zst", 404),
    ]
    for method, target, status in attempts:
        got = await raw_request(service, method, target)
        assert got == status, (method, target, got)
    after = [key async for key in service.storage.keys("")]
    assert before == after
    assert await blob_count(service) == 0


async def test_oversize_bodies_get_413(make_service: ServiceFactory) -> None:
    svc = await make_service(max_upload_size=1000, max_document_size=100)
    body = os.urandom(5000)
    resp = await svc.client.put(f"/main/{nar_url(body, '')}", data=body, headers=svc.auth())
    assert resp.status == 413

    async def chunked():  # no Content-Length: the limit is enforced while streaming
        for _ in range(10):
            yield os.urandom(500)

    resp = await svc.client.put("/main/log/big", data=chunked(), headers=svc.auth())
    assert resp.status == 413
    resp = await svc.client.put(
        f"/main/{'0' * 32}.narinfo", data=b"StorePath: x\n" * 20, headers=svc.auth()
    )
    assert resp.status == 413
    assert await blob_count(svc) == 0


async def test_opaque_extras_round_trip(service: Service) -> None:
    log = b"building rust_app...\n" * 500
    resp = await service.client.put(
        "/main/log/abc-rust_app-0.1.0.drv",
        data=log,
        headers={**service.auth(), "Content-Type": "text/plain; charset=utf-8"},
    )
    assert resp.status == 200
    got = await service.client.get("/main/log/abc-rust_app-0.1.0.drv")
    assert got.headers["Content-Type"].startswith("text/plain")
    assert await got.read() == log
    listing = b'{"version":1,"root":{"type":"regular","size":3}}'
    await service.client.put(f"/main/{'1' * 32}.ls", data=listing, headers=service.auth())
    assert await (await service.client.get(f"/main/{'1' * 32}.ls")).read() == listing
    realisation = "/main/realisations/sha256:" + "2" * 52 + "!out.doi"
    assert (await service.client.put(realisation, data=b"{}", headers=service.auth())).status == 200
    assert (await service.client.get(realisation)).status == 200
    assert (await service.client.get("/main/log/unknown")).status == 404


@pytest.mark.parametrize(
    ("sent", "served"),
    [
        ("text/plain; charset=utf-8", "text/plain; charset=utf-8"),
        ("application/json", "application/json"),
        ("Application/JSON", "application/json"),
        ("text/html", "application/octet-stream"),
        ("image/svg+xml", "application/octet-stream"),
        ('text/plain; charset="><script>', "text/plain"),
        ("x" * 5000, "application/octet-stream"),
        ("", "application/octet-stream"),
    ],
)
async def test_an_opaque_object_is_never_served_as_a_page(
    service: Service, sent: str, served: str
) -> None:
    """A writer cannot make the cache's origin serve HTML or SVG (script) to a browser."""
    headers = {**service.auth(), "Content-Type": sent} if sent else service.auth()
    resp = await service.client.put("/main/log/page", data=b"<script>x</script>", headers=headers)
    assert resp.status == 200
    for accept in ("zstd", "identity"):
        got = await service.client.get(
            "/main/log/page", headers={"Accept-Encoding": accept}, auto_decompress=False
        )
        assert got.headers["Content-Type"] == served
        assert got.headers["X-Content-Type-Options"] == "nosniff"


async def test_expect_continue_refuses_before_the_body(service: Service) -> None:
    host, port = service.client.host, service.client.port
    for headers, status in (
        ("", b"401"),
        (
            f"Authorization: Bearer {service.write_token}\r\nContent-Length: 99999999999999\r\n",
            b"413",
        ),
        (f"Authorization: Bearer {service.write_token}\r\n", b"100"),
    ):
        reader, writer = await asyncio.open_connection(host, port)
        if "Content-Length" not in headers:
            headers += "Content-Length: 10\r\n"
        writer.write(
            f"PUT /main/log/x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n{headers}\r\n".encode()
        )
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 5)
        assert line.split()[1] == status, line
        writer.close()


async def test_unreachable_storage_is_503_with_retry_after(make_service: ServiceFactory) -> None:
    from larder.errors import StorageUnavailable
    from larder.storage.memory import MemoryStorage

    class Down(MemoryStorage):
        fail = False

        async def get(self, key: str) -> bytes | None:
            if self.fail:
                raise StorageUnavailable("connection refused")
            return await super().get(key)

        async def check(self) -> None:
            raise StorageUnavailable("connection refused")

    storage = Down()
    svc = await make_service(storage)
    storage.fail = True
    svc.client.app[state.CACHES]._seen.clear()
    resp = await svc.client.get(f"/main/{'0' * 32}.narinfo")
    assert resp.status == 503
    assert resp.headers["Retry-After"].isdigit()
    # The backend's own message (an endpoint, a bucket, a key) stays in the log.
    assert await resp.text() == "storage is unavailable; retry later\n"
    assert (await svc.client.get("/readyz")).status == 503
    assert (await svc.client.get("/healthz")).status == 200


async def test_readyz_does_not_wait_for_a_hung_storage(
    make_service: ServiceFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backend that accepts and never answers (a stuck endpoint, retried for its own timeout)
    is a 503 within READY_TIMEOUT, so the probe and the load balancer see it."""
    from larder.service.routes import api
    from larder.storage.memory import MemoryStorage

    class Hung(MemoryStorage):
        async def check(self) -> None:
            await asyncio.sleep(3600)

    monkeypatch.setattr(api, "READY_TIMEOUT", 0.2)
    svc = await make_service(Hung())
    resp = await asyncio.wait_for(svc.client.get("/readyz"), 10)
    assert resp.status == 503 and resp.headers["Retry-After"].isdigit()
    assert (await svc.client.get("/healthz")).status == 200


@pytest.mark.parametrize("compression", ["xz", "zstd"])  # re-encoded, and kept as it came
async def test_full_storage_is_507_and_stores_nothing(
    make_service: ServiceFactory, compression: str
) -> None:
    from larder.errors import StorageFull
    from larder.storage.memory import MemoryStorage

    class Full(MemoryStorage):
        def blob_writer(self, *, encoded=False):  # type: ignore[no-untyped-def]
            writer = super().blob_writer(encoded=encoded)

            def refuse(data: bytes) -> None:
                raise StorageFull("no space left on device")

            writer.write = refuse  # type: ignore[method-assign]
            writer.write_encoded = refuse  # type: ignore[method-assign]
            return writer

    svc = await make_service(Full())
    nar = make_nar(b"full")
    body = lzma.compress(nar) if compression == "xz" else zstandard.ZstdCompressor().compress(nar)
    url = f"/main/{nar_url(body, '.xz' if compression == 'xz' else '.zst')}"
    resp = await svc.client.put(url, data=body, headers=svc.auth())
    assert resp.status == 507
    assert await blob_count(svc) == 0


async def _nar_put_head(
    svc: Service, nar: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that has sent the head of a PUT of ``nar`` and none of its body."""
    reader, writer = await asyncio.open_connection(svc.client.host, svc.client.port)
    writer.write(
        f"PUT /main/{nar_url(nar, '')} HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {svc.write_token}\r\nContent-Length: {len(nar)}\r\n\r\n".encode()
    )
    return reader, writer


async def test_a_stalled_upload_is_dropped_and_stores_nothing(make_service: ServiceFactory) -> None:
    svc = await make_service(body_idle_timeout=0.3)
    nar = write_nar({"type": "regular", "contents": os.urandom(50_000)})
    reader, writer = await _nar_put_head(svc, nar)
    writer.write(nar[:1000])  # then nothing: the client stalls with the connection open
    await writer.drain()
    status = (await asyncio.wait_for(reader.readline(), 5)).split()[1]
    writer.close()
    assert status == b"408"
    assert await blob_count(svc) == 0
    assert [k async for k in svc.storage.keys("caches/main/nar/")] == []


async def test_an_upload_that_trickles_in_is_dropped_and_stores_nothing(
    make_service: ServiceFactory,
) -> None:
    """A byte every 0.2 s never trips the 0.5 s idle timeout; the average rate past it does,
    while the client is still sending."""
    svc = await make_service(body_idle_timeout=0.5)
    nar = write_nar({"type": "regular", "contents": os.urandom(50_000)})
    reader, writer = await _nar_put_head(svc, nar)
    answer = asyncio.ensure_future(reader.readline())
    sent = 0
    while not answer.done() and sent < 40:  # 8 s of trickling at most
        writer.write(nar[sent : sent + 1])
        sent += 1
        await asyncio.sleep(0.2)
    assert answer.done(), "the trickle was still being read"
    status = (await answer).split()[1]
    writer.close()
    assert status == b"408"
    assert await blob_count(svc) == 0


async def test_cache_that_requires_trusted_upload_signatures(service: Service) -> None:
    trusted = SecretKey.generate("ci.example-1")
    untrusted = SecretKey.generate("pr.example-1")
    registry = service.client.app[state.CACHES]
    settings = await registry.get("main")
    assert settings is not None
    await registry.update(
        dataclasses.replace(settings, trusted_upload_keys=(trusted.public_key().to_string(),))
    )
    nar = make_nar(b"trusted content")
    body = lzma.compress(nar)
    await service.client.put(f"/main/{nar_url(body)}", data=body, headers=service.auth())
    path = store_path("needs-sig-1.0")
    unsigned = narinfo_text(path, nar)
    fingerprint = narinfo.fingerprint(narinfo.parse(unsigned))
    url = f"/main/{hash_part(path)}.narinfo"
    for sig in (None, untrusted.sign(fingerprint), trusted.sign(b"another fingerprint")):
        document = unsigned + (f"Sig: {sig}\n".encode() if sig else b"")
        resp = await service.client.put(url, data=document, headers=service.auth())
        assert resp.status == 400 and "trusts for uploads" in await resp.text(), sig
        assert (await service.client.get(url)).status == 404
    document = unsigned + f"Sig: {trusted.sign(fingerprint)}\n".encode()
    resp = await service.client.put(url, data=document, headers=service.auth())
    assert resp.status == 200, await resp.text()
    assert (await service.client.get(url)).status == 200
