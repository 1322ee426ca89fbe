"""Bodies Nix 2.34 sends with a Content-Encoding, NAR compressions beyond xz/bzip2/zstd, the
FileHash of served narinfos, HEAD of a NAR by its upload name, and debuginfo documents."""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import hashlib
import json
import lzma
import zlib
from collections.abc import AsyncIterator

import brotli
import pytest
import zstandard

from larder.core import keys
from larder.core.nixcache import FileRecord
from larder.protocol import narinfo, nix32
from larder.service import state
from tests.service.conftest import Service, ServiceFactory
from tests.service.test_nix_routes import (
    blob_count,
    hash_part,
    make_nar,
    narinfo_text,
    push,
    store_path,
)

ENCODERS = {
    "gzip": gzip.compress,
    "x-gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": lambda data: zstandard.ZstdCompressor().compress(data),
    "xz": lzma.compress,
    "bzip2": bz2.compress,
    "identity": lambda data: data,
}
NAR_ENCODERS = {
    ".xz": lzma.compress,
    ".bz2": bz2.compress,
    ".zst": lambda data: zstandard.ZstdCompressor().compress(data),
    ".br": brotli.compress,
    ".gz": gzip.compress,
    "": lambda data: data,
}


def file_name(body: bytes, ext: str) -> str:
    return f"nar/{nix32.encode(hashlib.sha256(body).digest())}.nar{ext}"


async def narinfo_and_nar(service: Service, path: str, nar: bytes) -> tuple[narinfo.NarInfo, bytes]:
    """Upload the narinfo of ``path`` (its NAR is held); the narinfo served and its NAR's bytes."""
    resp = await service.client.put(
        f"/main/{hash_part(path)}.narinfo", data=narinfo_text(path, nar), headers=service.auth()
    )
    assert resp.status == 200, await resp.text()
    served = narinfo.parse(
        await (await service.client.get(f"/main/{hash_part(path)}.narinfo")).read()
    )
    return served, await (await service.client.get(f"/main/{served.url}")).read()


async def stored_keys(service: Service) -> list[str]:
    return [key async for key in service.storage.keys("caches/")]


@pytest.mark.parametrize("coding", sorted(ENCODERS))
async def test_a_coded_log_is_stored_decoded_and_served_as_the_client_accepts(
    service: Service, coding: str
) -> None:
    log = b"Compiling rust_app v0.1.0\n" * 4000
    path = "/main/log/abc-rust_app-0.1.0.drv"
    headers = {**service.auth(), "Content-Type": "text/plain", "Content-Encoding": coding}
    resp = await service.client.put(path, data=ENCODERS[coding](log), headers=headers)
    assert resp.status == 200, await resp.text()

    plain = await service.client.get(
        path, headers={"Accept-Encoding": "identity"}, auto_decompress=False
    )
    assert "Content-Encoding" not in plain.headers
    assert await plain.read() == log
    zstd = await service.client.get(
        path, headers={"Accept-Encoding": "deflate, gzip, br, zstd"}, auto_decompress=False
    )
    assert zstd.headers["Content-Encoding"] == "zstd"
    assert zstd.headers["Vary"] == "Accept-Encoding"
    assert zstandard.ZstdDecompressor().decompressobj().decompress(await zstd.read()) == log
    head = await service.client.head(path, headers={"Accept-Encoding": "identity"})
    assert head.headers["Content-Length"] == str(len(log))
    # Nix's own client: curl decodes what it offered.
    no_header = await service.client.get(path, skip_auto_headers=["Accept-Encoding"])
    assert await no_header.read() == log


async def test_a_coded_narinfo_is_decoded_then_verified(service: Service) -> None:
    for n, coding in enumerate(sorted(ENCODERS)):
        path = store_path(f"coded-{n}")
        nar = make_nar(f"payload {n}".encode())
        body = lzma.compress(nar)
        resp = await service.client.put(
            f"/main/{file_name(body, '.xz')}", data=body, headers=service.auth()
        )
        assert resp.status == 200
        text = narinfo_text(path, nar)
        resp = await service.client.put(
            f"/main/{hash_part(path)}.narinfo",
            data=ENCODERS[coding](text),
            headers={**service.auth(), "Content-Encoding": coding},
        )
        assert resp.status == 200, (coding, await resp.text())
        served = narinfo.parse(
            await (await service.client.get(f"/main/{hash_part(path)}.narinfo")).read()
        )
        assert served.nar_size == len(nar)
    # Still verified once decoded: a wrong NarSize is refused.
    path = store_path("coded-wrong")
    resp = await service.client.put(
        f"/main/{hash_part(path)}.narinfo",
        data=gzip.compress(narinfo_text(path, nar, NarSize="1")),
        headers={**service.auth(), "Content-Encoding": "gzip"},
    )
    assert resp.status == 400


@pytest.mark.parametrize(
    ("target", "coding", "body", "status"),
    [
        ("/main/log/x", "compress", b"x", 415),
        ("/main/log/x", "gzip, br", brotli.compress(gzip.compress(b"x")), 415),
        ("/main/log/x", "gzip", b"not gzip at all", 400),
        ("/main/log/x", "xz", lzma.compress(b"truncated" * 1000)[:-20], 400),
        (f"/main/{'3' * 32}.narinfo", "br", b"\x00garbage", 400),
        (f"/main/{'3' * 32}.narinfo", "lz4", b"x", 415),
        ("/main/" + file_name(b"x", ".xz"), "gzip", gzip.compress(b"x"), 415),
        ("/main/sccache/a/b/c/" + "0" * 64, "gzip", gzip.compress(b"x"), 415),
    ],
    ids=["unknown", "twice", "corrupt", "truncated", "narinfo", "lz4", "nar", "sccache"],
)
async def test_bad_codings_are_refused_and_change_nothing(
    service: Service, target: str, coding: str, body: bytes, status: int
) -> None:
    before, blobs = await stored_keys(service), await blob_count(service)
    headers = {**service.auth(), "Content-Encoding": coding}
    resp = await service.client.put(target, data=body, headers=headers)
    assert resp.status == status, await resp.text()
    assert await stored_keys(service) == before
    assert await blob_count(service) == blobs


async def test_a_coded_bomb_stops_at_max_nar_size(make_service: ServiceFactory) -> None:
    service = await make_service(max_nar_size=1024 * 1024)
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (64 * 1024 * 1024))
    headers = {**service.auth(), "Content-Encoding": "zstd"}
    resp = await service.client.put("/main/log/bomb", data=bomb, headers=headers)
    assert resp.status == 413
    assert await stored_keys(service) == []
    nar = make_nar(b"\0" * (4 * 1024 * 1024))
    body = zstandard.ZstdCompressor().compress(nar)
    assert len(body) < 1024 * 1024
    resp = await service.client.put(
        f"/main/{file_name(body, '.zst')}", data=body, headers=service.auth()
    )
    assert resp.status == 413
    assert await stored_keys(service) == []
    assert await blob_count(service) == 0


@pytest.mark.parametrize("ext", sorted(NAR_ENCODERS))
async def test_served_narinfo_has_the_file_hash_of_the_bytes_its_url_serves(
    service: Service, ext: str
) -> None:
    path = store_path(f"filehash{ext}")
    nar = make_nar(b"file hash payload " * 5000)
    body = NAR_ENCODERS[ext](nar)
    # Nix names a gzip NAR .nar: larder tells it by its magic bytes.
    name = file_name(body, "" if ext == ".gz" else ext)
    resp = await service.client.put(f"/main/{name}", data=body, headers=service.auth())
    assert resp.status == 200, await resp.text()
    resp = await service.client.put(
        f"/main/{hash_part(path)}.narinfo", data=narinfo_text(path, nar), headers=service.auth()
    )
    assert resp.status == 200, await resp.text()
    served = narinfo.parse(
        await (await service.client.get(f"/main/{hash_part(path)}.narinfo")).read()
    )
    served_bytes = await (await service.client.get(f"/main/{served.url}")).read()
    assert served.file_hash is not None
    assert served.file_hash.digest == hashlib.sha256(served_bytes).digest()
    assert served.file_size == len(served_bytes)
    if ext == ".zst":
        assert served_bytes == body  # kept as it came: the upload's own FileHash


async def test_file_hash_follows_the_bytes_kept_when_a_nar_comes_twice(service: Service) -> None:
    nar = make_nar(b"twice " * 20000)
    first = zstandard.ZstdCompressor(level=19).compress(nar)
    second = lzma.compress(nar)
    for body, ext in ((first, ".zst"), (second, ".xz")):
        resp = await service.client.put(
            f"/main/{file_name(body, ext)}", data=body, headers=service.auth()
        )
        assert resp.status == 200
    served, served_bytes = await narinfo_and_nar(service, store_path("twice"), nar)
    assert served.file_hash is not None
    assert served.file_hash.digest == hashlib.sha256(served_bytes).digest()


@pytest.mark.parametrize("window_log", [20, 23, 24, 27])
async def test_a_zstd_nar_is_kept_as_sent_only_with_a_small_window(
    service: Service, window_log: int
) -> None:
    """A stored NAR is also served decoded, one decoder of its window per download: an upload
    compressed with a window past 8 MiB (``--ultra``, ``--long``) is stored re-encoded."""
    nar = make_nar(b"window " * 5000)
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=window_log)
    stream = zstandard.ZstdCompressor(compression_params=params).compressobj()
    body = stream.compress(nar) + stream.flush()  # no size given: the window stays as asked
    assert zstandard.get_frame_parameters(body).window_size == 1 << window_log
    resp = await service.client.put(f"/main/{file_name(body, '.zst')}", data=body,
                                    headers=service.auth())  # fmt: skip
    assert resp.status == 200, await resp.text()
    _, stored = await narinfo_and_nar(service, store_path(f"window{window_log}"), nar)
    assert zstandard.ZstdDecompressor().decompressobj().decompress(stored) == nar
    assert zstandard.get_frame_parameters(stored).window_size <= 8 << 20
    assert (stored == body) is (window_log <= 23)


def _windowed(data: bytes, window_log: int) -> bytes:
    """One zstd frame of ``data`` that keeps a window of ``2**window_log`` (no content size)."""
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=window_log)
    stream = zstandard.ZstdCompressor(compression_params=params).compressobj()
    return stream.compress(data) + stream.flush()


async def test_a_later_zstd_frame_past_the_kept_window_fails_the_upload(service: Service) -> None:
    """The first frame decides that an upload is kept as sent; a later frame with a larger
    window would make every decoded download of it hold that window, so the upload fails."""
    nar = make_nar(b"frames " * 20000)
    half = len(nar) // 2
    body = _windowed(nar[:half], 20) + _windowed(nar[half:], 27)
    before, blobs = await stored_keys(service), await blob_count(service)
    resp = await service.client.put(
        f"/main/{file_name(body, '.zst')}", data=body, headers=service.auth()
    )
    assert resp.status == 400
    assert "frame 2" in await resp.text()
    assert await stored_keys(service) == before
    assert await blob_count(service) == blobs
    # The same NAR in one setting throughout is taken (and, with this window, kept).
    body = _windowed(nar[:half], 20) + _windowed(nar[half:], 23)
    resp = await service.client.put(
        f"/main/{file_name(body, '.zst')}", data=body, headers=service.auth()
    )
    assert resp.status == 200, await resp.text()
    _, stored = await narinfo_and_nar(service, store_path("frames"), nar)
    assert stored == body


async def test_head_finds_a_nar_by_the_name_it_was_uploaded_under(
    make_service: ServiceFactory,
) -> None:
    service = await make_service()
    nar = make_nar(b"uploaded once")
    body = lzma.compress(nar)
    name = file_name(body, ".xz")
    assert (await service.client.head(f"/main/{name}")).status == 404
    await push(service, store_path("head"), nar)
    assert (await service.client.head(f"/main/{name}")).status == 200
    assert (await service.client.get(f"/main/{name}")).status == 404  # no .xz file is kept
    # The same hash with another compression, another cache, or an unknown name: not here.
    other = name.replace(".nar.xz", ".nar.bz2")
    assert (await service.client.head(f"/main/{other}")).status == 404
    await service.client.app[state.CACHES].create("other")
    assert (await service.client.head(f"/other/{name}")).status == 404
    unknown = file_name(b"never uploaded", ".xz")
    assert (await service.client.head(f"/main/{unknown}")).status == 404


async def test_the_name_a_zstd_nar_was_uploaded_under_serves_it(service: Service) -> None:
    """The pushing machine keeps the narinfo it uploaded (URL ``nar/<FileHash>.nar.zst``) in its
    narinfo cache and later substitutes from that URL: the NAR is served there, as zstd."""
    nar = make_nar(b"pushed from here" * 1000)
    name = file_name(zstandard.ZstdCompressor().compress(nar), ".zst")  # as push() sends it
    assert (await service.client.get(f"/main/{name}")).status == 404
    await push(service, store_path("pushed"), nar, ext=".zst")
    served = await service.client.get(f"/main/{name}")
    assert served.status == 200
    assert zstandard.ZstdDecompressor().decompress(await served.read()) == nar
    head = await service.client.head(f"/main/{name}")
    assert head.status == 200
    for field in ("Content-Length", "Content-Type", "Accept-Ranges"):
        assert head.headers.get(field) == served.headers.get(field), field
    # Another compression's upload name is not served as zstd, nor as what it was.
    xz = file_name(lzma.compress(nar), ".xz")
    assert (await service.client.get(f"/main/{xz.replace('.xz', '.zst')}")).status == 404


async def test_debuginfo_points_at_the_nar_larder_serves(service: Service) -> None:
    nar = make_nar(b"\x7fELF debug symbols")
    body = lzma.compress(nar)
    nar_hash = nix32.encode(hashlib.sha256(nar).digest())
    doc = {"archive": f"../{file_name(body, '.xz')}", "member": "lib/debug/.build-id/ab/cd.debug"}
    # Nix uploads the document first, then the NAR it names.
    resp = await service.client.put(
        "/main/debuginfo/abcd", data=json.dumps(doc).encode(), headers=service.auth()
    )
    assert resp.status == 200
    assert json.loads(await (await service.client.get("/main/debuginfo/abcd")).read()) == doc
    await push(service, store_path("with-debug"), nar)
    stored = json.loads(await (await service.client.get("/main/debuginfo/abcd")).read())
    assert stored == {**doc, "archive": f"../nar/{nar_hash}.nar.zst"}
    nar_resp = await service.client.get(f"/main/{stored['archive'].removeprefix('../')}")
    assert nar_resp.status == 200
    # A document about a NAR larder never saw is kept as it came.
    unknown = {"archive": "../" + file_name(b"elsewhere", ".xz"), "member": "x"}
    await service.client.put(
        "/main/debuginfo/ef01", data=json.dumps(unknown).encode(), headers=service.auth()
    )
    assert json.loads(await (await service.client.get("/main/debuginfo/ef01")).read()) == unknown
    # So is one nested deeper than the JSON reader goes (every read of it was a 500).
    for deep in (b"[" * 3000 + b"]" * 3000, b'{"archive":' * 3000 + b"1" + b"}" * 3000):
        await service.client.put("/main/debuginfo/0dee", data=deep, headers=service.auth())
        resp = await service.client.get("/main/debuginfo/0dee")
        assert resp.status == 200 and await resp.read() == deep


async def test_debuginfo_of_a_gzip_nar_points_at_the_nar_larder_serves(service: Service) -> None:
    """Nix names a gzip NAR ``.nar``; the document naming it is rewritten as for the others."""
    nar = make_nar(b"\x7fELF gzip debug symbols")
    body = gzip.compress(nar)
    archive = "../" + file_name(body, "")
    doc = {"archive": archive, "member": "lib/debug/.build-id/12/34.debug"}
    resp = await service.client.put("/main/" + file_name(body, ""), data=body,
                                    headers=service.auth())  # fmt: skip
    assert resp.status == 200, await resp.text()
    resp = await service.client.put(
        "/main/debuginfo/1234", data=json.dumps(doc).encode(), headers=service.auth()
    )
    assert resp.status == 200
    stored = json.loads(await (await service.client.get("/main/debuginfo/1234")).read())
    nar_hash = nix32.encode(hashlib.sha256(nar).digest())
    assert stored == {**doc, "archive": f"../nar/{nar_hash}.nar.zst"}
    nar_resp = await service.client.get(f"/main/{stored['archive'].removeprefix('../')}")
    assert nar_resp.status == 200


async def test_objects_stored_coded_by_earlier_versions_are_served_decoded(
    service: Service,
) -> None:
    """Before larder decoded uploads, an xz or bzip2 log was kept as sent with its coding
    (gzip and deflate were kept decoded): both are served plain now."""
    log = b"an old build log\n" * 1000
    blobs = service.client.app[state.BLOBS]
    for name, coding, data in (
        ("old-xz", "xz", lzma.compress(log)),
        ("old-bz2", "bzip2", bz2.compress(log)),
        ("old-gzip", "gzip", log),
    ):
        blob = await blobs.store(_chunks(data))
        record = FileRecord(blob.blob_id, blob.size, "text/plain", coding)
        await service.storage.put(keys.extra_file("main", f"log/{name}"), record.to_json())
        resp = await service.client.get(f"/main/log/{name}", auto_decompress=False)
        assert resp.status == 200
        assert "Content-Encoding" not in resp.headers
        assert await resp.read() == log


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_narinfos_stored_before_file_hashes_are_served_with_one(service: Service) -> None:
    """A narinfo and NAR record written before larder kept FileHash: the served narinfo gets
    the sha256 of the blob it points at (Nix aborts re-serialising a narinfo without one)."""
    path = store_path("from-an-older-larder")
    nar = make_nar(b"old " * 10000)
    await push(service, path, nar)
    nar_hash = nix32.encode(hashlib.sha256(nar).digest())
    record_key = keys.nar("main", nar_hash)
    record = json.loads(await service.storage.get(record_key) or b"{}")
    del record["file_hash"], record["uploaded_as"]
    await service.storage.put(record_key, json.dumps(record).encode())
    stored = narinfo.parse(await service.storage.get(keys.narinfo("main", hash_part(path))) or b"")
    old = dataclasses.replace(stored, file_hash=None)
    await service.storage.put(keys.narinfo("main", hash_part(path)), narinfo.render(old).encode())

    served = narinfo.parse(
        await (await service.client.get(f"/main/{hash_part(path)}.narinfo")).read()
    )
    blob = await (await service.client.get(f"/main/{served.url}")).read()
    assert served.file_hash is not None
    assert served.file_hash.digest == hashlib.sha256(blob).digest()
    assert served.file_size == len(blob)
    # Read back once: the record keeps it for every later lookup, of any process.
    kept = json.loads(await service.storage.get(record_key) or b"{}")
    assert kept == {**record, "file_hash": served.file_hash.nix32()}
