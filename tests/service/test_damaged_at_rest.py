"""Objects damaged at rest on a disk store (a blob cut short or overwritten, a narinfo record
that no longer parses): never served as complete and good, and repaired by the next upload."""

from __future__ import annotations

import asyncio
import hashlib
import json
import lzma
import os
from pathlib import Path
from typing import Any

import pytest
import zstandard

from larder.core import keys, nixcache
from larder.protocol import nix32
from larder.storage.disk import DiskStorage
from tests.service.conftest import Service, ServiceFactory, capturing_logger
from tests.service.test_nix_routes import hash_part, make_nar, narinfo_text, store_path

# Random bytes: zstd stores them in raw blocks, so a flipped byte still decodes (to other
# content) and only the content hash can tell.
NAR = make_nar(os.urandom(600_000))
NAR_HASH = nix32.encode(hashlib.sha256(NAR).digest())
# As Nix writes it: one frame, no checksum (larder keeps such an upload as it came).
UPLOAD = zstandard.ZstdCompressor(write_checksum=False).compress(NAR)
UPLOAD_URL = f"/main/nar/{nix32.encode(hashlib.sha256(UPLOAD).digest())}.nar.zst"


@pytest.fixture
async def disk(make_service: ServiceFactory, tmp_path: Path) -> Service:
    return await make_service(DiskStorage(tmp_path / "store"))


async def upload(service: Service) -> Path:
    """Push the NAR as zstd; the path of its blob file."""
    resp = await service.client.put(UPLOAD_URL, data=UPLOAD, headers=service.auth())
    assert resp.status == 200, await resp.text()
    record = await service.storage.get(keys.nar("main", NAR_HASH))
    assert record is not None
    storage = service.storage
    assert isinstance(storage, DiskStorage)
    return storage._blob_path(json.loads(record)["blob"])


def flip(blob: Path, offset: int) -> None:
    data = bytearray(blob.read_bytes())
    data[offset] ^= 0xFF
    blob.write_bytes(bytes(data))


async def raw_get(service: Service, target: str) -> tuple[bytes, int, bytes]:
    """Status line, Content-Length and the body received before the connection closed."""
    reader, writer = await asyncio.open_connection(service.client.host, service.client.port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    received = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next(int(h.split(b":")[1]) for h in lines if h.lower().startswith(b"content-length"))
    return lines[0], length, body


async def test_a_decoded_nar_whose_blob_was_overwritten_is_never_sent_whole(
    disk: Service,
) -> None:
    blob = await upload(disk)
    flip(blob, blob.stat().st_size // 2)  # still decodes, to other bytes of the same size
    logger, messages = capturing_logger("larder.http")
    status, length, body = await raw_get(disk, f"/main/nar/{NAR_HASH}.nar")
    assert status.startswith(b"HTTP/1.1 200") and length == len(NAR)
    assert len(body) < len(NAR)  # cut: the client knows the download failed
    await asyncio.sleep(0.1)
    assert any("damaged" in m for m in messages), messages
    del logger


async def test_a_nar_blob_cut_short_is_a_server_error_not_a_short_download(
    disk: Service,
) -> None:
    blob = await upload(disk)
    os.truncate(blob, blob.stat().st_size // 2)
    for method in ("GET", "HEAD"):
        resp = await disk.client.request(method, f"/main/nar/{NAR_HASH}.nar.zst")
        assert resp.status == 500, method
    served = await disk.client.get(UPLOAD_URL)  # the upload's own name, aliased
    assert served.status == 500


async def test_uploading_the_same_nar_again_replaces_a_damaged_blob(disk: Service) -> None:
    blob = await upload(disk)
    os.truncate(blob, blob.stat().st_size - 100)
    await upload(disk)
    assert blob.read_bytes() == UPLOAD
    resp = await disk.client.get(f"/main/nar/{NAR_HASH}.nar")
    assert resp.status == 200 and await resp.read() == NAR
    zst = await disk.client.get(f"/main/nar/{NAR_HASH}.nar.zst")
    assert zst.status == 200 and await zst.read() == UPLOAD


async def test_the_same_nar_uploaded_again_keeps_a_sound_blob(disk: Service) -> None:
    """A second upload of sound content changes nothing at rest (another encoding of it, here
    xz that larder encodes itself, does not replace the kept one)."""
    blob = await upload(disk)
    before = blob.stat().st_ino
    body = lzma.compress(NAR, preset=0)
    url = f"/main/nar/{nix32.encode(hashlib.sha256(body).digest())}.nar.xz"
    resp = await disk.client.put(url, data=body, headers=disk.auth())
    assert resp.status == 200
    assert blob.stat().st_ino == before and blob.read_bytes() == UPLOAD
    assert (await resp.json())["stored_size"] == len(UPLOAD)


async def test_a_narinfo_that_no_longer_parses_is_missing_until_uploaded_again(
    disk: Service,
) -> None:
    await upload(disk)
    path = store_path("damaged-1.0")
    url = f"/main/{hash_part(path)}.narinfo"
    resp = await disk.client.put(url, data=narinfo_text(path, NAR), headers=disk.auth())
    assert resp.status == 200
    await disk.storage.put(keys.narinfo("main", hash_part(path)), b"\x00garbage\n")
    logger, messages = capturing_logger("larder.core.nixcache")
    fresh = await disk.client.get(url)
    assert fresh.status == 404
    assert (await disk.client.head(url)).status == 404  # what `nix copy` asks before uploading
    assert any("corrupt" in m for m in messages), messages
    resp = await disk.client.put(url, data=narinfo_text(path, NAR), headers=disk.auth())
    assert resp.status == 200
    again = await disk.client.get(url)
    assert again.status == 200 and b"StorePath: " + path.encode() in await again.read()
    del logger


async def test_a_sound_blob_of_another_size_than_its_record_is_served(
    disk: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Content stored again in another encoding (S3 commits racing) leaves records stating an
    older size: the blob decodes to its content, so it goes out, and is decoded only once."""
    await upload(disk)
    key = keys.nar("main", NAR_HASH)
    record = json.loads(await disk.storage.get(key) or b"{}")
    await disk.storage.put(key, json.dumps({**record, "stored_size": 12345}).encode())
    checks = []
    real = nixcache.is_sound

    async def counted(*args: Any) -> bool:
        checks.append(args[1:])
        return await real(*args)

    monkeypatch.setattr(nixcache, "is_sound", counted)
    for _ in range(3):
        resp = await disk.client.get(f"/main/nar/{NAR_HASH}.nar.zst")
        assert resp.status == 200 and await resp.read() == UPLOAD
    assert len(checks) == 1


@pytest.mark.parametrize("damage", [b"\x00not json", b'{"blob": "../../etc"}', b"[1, 2]"])
async def test_a_nar_record_that_no_longer_parses_is_missing_until_uploaded_again(
    disk: Service, damage: bytes
) -> None:
    await upload(disk)
    await disk.storage.put(keys.nar("main", NAR_HASH), damage)
    logger, messages = capturing_logger("larder.core.nixcache")
    for method in ("GET", "HEAD"):  # HEAD: what Nix 2.34 asks before uploading
        assert (await disk.client.request(method, UPLOAD_URL)).status == 404
        resp = await disk.client.request(method, f"/main/nar/{NAR_HASH}.nar.zst")
        assert resp.status == 404
    assert any("NAR record" in m for m in messages), messages
    await upload(disk)
    resp = await disk.client.get(f"/main/nar/{NAR_HASH}.nar")
    assert resp.status == 200 and await resp.read() == NAR
    del logger


LOG = b"building rust crate serde\n" * 40_000  # compressible: larder's own encoding


async def test_a_cut_log_never_goes_out_whole_to_a_client_that_takes_zstd(disk: Service) -> None:
    """Nix 2.34 asks logs with Accept-Encoding: zstd: the stored stream went out unchecked."""
    url = "/main/log/abc-serde-1.0.drv"
    resp = await disk.client.put(url, data=LOG, headers=disk.auth())
    assert resp.status == 200
    record = json.loads(
        await disk.storage.get(keys.extra_file("main", "log/abc-serde-1.0.drv")) or b"{}"
    )
    storage = disk.storage
    assert isinstance(storage, DiskStorage)
    blob = storage._blob_path(record["blob"])
    os.truncate(blob, blob.stat().st_size // 2)
    reader, writer = await asyncio.open_connection(disk.client.host, disk.client.port)
    head = f"GET {url} HTTP/1.1\r\nHost: x\r\nAccept-Encoding: zstd\r\nConnection: close\r\n"
    writer.write(f"{head}\r\n".encode())
    received = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"content-encoding" not in head.lower()
    assert len(body) < len(LOG)  # decoded, hashed, and cut


@pytest.mark.parametrize("damage", [b"\x00", b'{"blob": 1}', b'{"size": 3}'])
async def test_damaged_records_of_logs_and_sccache_entries_are_missing(
    disk: Service, damage: bytes
) -> None:
    log_url, entry_url = "/main/log/abc-serde-1.0.drv", "/main/sccache/a/b/c/0123456789abcdef"
    for url in (log_url, entry_url):
        assert (await disk.client.put(url, data=LOG, headers=disk.auth())).status in (200, 201)
    await disk.storage.put(keys.extra_file("main", "log/abc-serde-1.0.drv"), damage)
    await disk.storage.put(keys.sccache_entry("main", "a/b/c/0123456789abcdef"), damage)
    for url in (log_url, entry_url):
        for method in ("GET", "HEAD"):
            resp = await disk.client.request(method, url, headers=disk.auth())
            assert resp.status == 404, (method, url)
    listing = await disk.client.request(
        "PROPFIND", "/main/sccache/a/b/c/", headers={**disk.auth(), "Depth": "1"}
    )
    assert listing.status == 207 and b"0123456789abcdef" not in await listing.read()
    for url in (log_url, entry_url):  # uploaded again: replaced
        assert (await disk.client.put(url, data=LOG, headers=disk.auth())).status in (200, 201)
        resp = await disk.client.get(url, headers=disk.auth())
        assert resp.status == 200 and await resp.read() == LOG
