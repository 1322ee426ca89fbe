"""Blob uploads in a Content-Encoding: zstd kept as sent once it decoded to the named bytes,
other codings decoded and stored in larder's encoding, and bad streams refused with nothing
stored."""

from __future__ import annotations

import gzip
import io
import os

import pytest
import zstandard

from tests.service.conftest import Service, ServiceFactory
from tests.service.test_rustc_routes import blob_id, missing

DATA = os.urandom(200_000) + b"rlib text " * 30_000


def zstd(data: bytes, level: int = 1) -> bytes:
    return zstandard.ZstdCompressor(level=level).compress(data)


def windowed(data: bytes, window_log: int) -> bytes:
    """One zstd frame of ``data`` that keeps a window of ``2**window_log`` (no content size)."""
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=window_log)
    stream = zstandard.ZstdCompressor(compression_params=params).compressobj()
    return stream.compress(data) + stream.flush()


async def put(service: Service, name: str, body: bytes, coding: str | None) -> tuple[int, str]:
    headers = service.auth()
    if coding is not None:
        headers["Content-Encoding"] = coding
    resp = await service.client.put(
        f"/main/rustc/blobs/{name}", data=io.BytesIO(body), headers=headers
    )
    return resp.status, await resp.text()


async def stored(service: Service) -> list[str]:
    return [b async for b in service.storage.blob_ids()]


async def test_a_zstd_upload_is_kept_as_sent(service: Service) -> None:
    body = zstd(DATA, level=1)
    status, text = await put(service, blob_id(DATA), body, "zstd")
    assert status == 200, text
    assert await missing(service, [blob_id(DATA)]) == []
    resp = await service.client.get(f"/main/rustc/blobs/{blob_id(DATA)}")
    served = await resp.read()
    assert served == body  # not encoded again at the server's level
    assert zstandard.ZstdDecompressor().decompressobj().decompress(served) == DATA


async def test_several_frames_are_one_stream(service: Service) -> None:
    half = len(DATA) // 2
    skippable = (0x184D2A50).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"xyz"
    body = zstd(DATA[:half]) + skippable + zstd(DATA[half:])
    status, text = await put(service, blob_id(DATA), body, "zstd")
    assert status == 200, text
    resp = await service.client.get(f"/main/rustc/blobs/{blob_id(DATA)}")
    assert await resp.read() == body


@pytest.mark.parametrize("window_log", [23, 24, 27])
async def test_a_zstd_upload_is_kept_only_with_a_small_window(
    service: Service, window_log: int
) -> None:
    """What is stored is also served decoded (clients without zstd): an upload whose window
    is past 8 MiB is stored in larder's own encoding, not kept as sent."""
    body = windowed(DATA, window_log)
    status, text = await put(service, blob_id(DATA), body, "zstd")
    assert status == 200, text
    resp = await service.client.get(f"/main/rustc/blobs/{blob_id(DATA)}")
    served = await resp.read()
    assert (served == body) is (window_log <= 23)
    assert zstandard.get_frame_parameters(served).window_size <= 8 << 20
    assert zstandard.ZstdDecompressor().decompressobj().decompress(served) == DATA


async def test_other_codings_are_decoded_and_encoded_again(service: Service) -> None:
    status, text = await put(service, blob_id(DATA), gzip.compress(DATA), "gzip")
    assert status == 200, text
    resp = await service.client.get(f"/main/rustc/blobs/{blob_id(DATA)}")
    assert zstandard.ZstdDecompressor().decompressobj().decompress(await resp.read()) == DATA


@pytest.mark.parametrize(
    ("body", "coding", "status", "says"),
    [
        (zstd(b"something else"), "zstd", 400, "content hash mismatch"),
        (zstd(DATA)[:-100], "zstd", 400, "truncated"),
        (zstd(DATA) + b"trailing", "zstd", 400, "zstd"),
        (b"not a zstd stream at all", "zstd", 400, "zstd"),
        (b"", "zstd", 400, "empty"),
        (DATA, "zstd", 400, "zstd"),  # sent raw but labelled zstd
        (zstd(DATA), None, 400, "content hash mismatch"),  # sent compressed, not labelled
        (zstd(DATA), "lz4", 415, "unsupported Content-Encoding"),
        (gzip.compress(zstd(DATA)), "zstd, gzip", 415, "more than one"),
        # kept as sent from its first frame on, then a frame with a 128 MiB window
        (windowed(DATA[:1000], 20) + windowed(DATA[1000:], 27), "zstd", 400, "frame 2"),
    ],
)
async def test_bad_coded_uploads_store_nothing(
    service: Service, body: bytes, coding: str | None, status: int, says: str
) -> None:
    before = await stored(service)
    got, text = await put(service, blob_id(DATA), body, coding)
    assert got == status, text
    assert says in text
    assert await stored(service) == before
    assert await missing(service, [blob_id(DATA)]) == [blob_id(DATA)]


async def test_a_small_upload_that_expands_past_the_limit_is_stopped(
    make_service: ServiceFactory,
) -> None:
    service = await make_service(max_upload_size=64 * 1024, max_nar_size=1024 * 1024)
    bomb = b"\0" * (8 * 1024 * 1024)
    body = zstd(bomb, level=19)
    assert len(body) < 64 * 1024
    status, text = await put(service, blob_id(bomb), body, "zstd")
    assert status == 413, text
    assert "decoded upload exceeds" in text
    assert await stored(service) == []
    # The limit on what is sent holds too, coded or not.
    status, _ = await put(service, blob_id(bomb), bomb, None)
    assert status == 413
    noise = os.urandom(100 * 1024)
    status, _ = await put(service, blob_id(noise), zstd(noise), "zstd")
    assert status == 413


async def test_the_same_bytes_sent_raw_then_coded_are_stored_once(service: Service) -> None:
    assert (await put(service, blob_id(DATA), DATA, None))[0] == 200
    assert (await put(service, blob_id(DATA), zstd(DATA), "zstd"))[0] == 200
    assert await stored(service) == [blob_id(DATA)]
    resp = await service.client.get(f"/main/rustc/blobs/{blob_id(DATA)}")
    assert zstandard.ZstdDecompressor().decompressobj().decompress(await resp.read()) == DATA
