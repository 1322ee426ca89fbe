"""Uploads' decoders share one budget of memory per process (larder.core.decoding): uploads
declaring huge zstd windows beyond it wait, then are 503 with Retry-After, while a normal upload
still goes through, and an upload that ends in any way gives its reservation back."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest
import zstandard

from larder.protocol import nix32
from larder.protocol.compression import zstd_frame_need
from larder.service import app as service_app
from larder.service import state
from tests.service.conftest import Service, ServiceFactory
from tests.service.test_nix_routes import make_nar

HUGE = zstd_frame_need(1 << 27)  # what a frame declaring a 128 MiB window reserves


def _string(data: bytes) -> bytes:
    return len(data).to_bytes(8, "little") + data + bytes(-len(data) % 8)


def _raw_block(data: bytes, last: bool = False) -> bytes:
    return ((len(data) << 3) | int(last)).to_bytes(3, "little") + data


def huge_window_start() -> bytes:
    """The first 300 KiB of a zstd NAR upload whose frame declares a 128 MiB window: a NAR of
    one 1 GiB file, in raw blocks (more than one body chunk, so the server reads it)."""
    head = b"".join(_string(s) for s in (b"nix-archive-1", b"(", b"type", b"regular"))
    head += _string(b"contents") + (1 << 30).to_bytes(8, "little")
    frame = (0xFD2FB528).to_bytes(4, "little") + bytes([0x00, (27 - 10) << 3])
    blocks = _raw_block(head) + b"".join(_raw_block(bytes(100 * 1024)) for _ in range(3))
    return frame + blocks


class Stalled:
    """A NAR upload sent over its own connection, which stops sending after its start."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def send(cls, service: Service, start: bytes) -> Stalled:
        reader, writer = await asyncio.open_connection(service.client.host, service.client.port)
        name = nix32.encode(os.urandom(32))
        writer.write(
            f"PUT /main/nar/{name}.nar.zst HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {service.write_token}\r\n"
            f"Content-Length: {len(start) + 100_000}\r\n\r\n".encode()
            + start
        )
        await writer.drain()
        return cls(reader, writer)

    async def answer(self, timeout: float) -> tuple[int, bytes]:
        """The status and headers the server answered (before the body was complete)."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        return int(head.split()[1]), head

    def close(self) -> None:
        self.writer.close()


async def until(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.02)


@pytest.fixture
def short_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_app, "DECODER_WAIT", 0.5)


async def metric(service: Service, name: str) -> float:
    """The value of series ``name`` (no labels) in ``/metrics``."""
    text = await (await service.client.get("/metrics")).text()
    return float(next(line for line in text.splitlines() if line.startswith(name + " ")).split()[1])


async def upload_normal_nar(service: Service, payload: bytes) -> int:
    nar = make_nar(payload)
    body = zstandard.ZstdCompressor(level=19).compress(nar)
    name = nix32.encode(hashlib.sha256(body).digest())
    resp = await service.client.put(f"/main/nar/{name}.nar.zst", data=body, headers=service.auth())
    return resp.status


async def test_an_upload_waits_for_memory_as_long_as_a_body_may_pause(
    make_service: ServiceFactory,
) -> None:
    """A 503 fails a Nix 2.8 push (it sends the PUT again without its body): an upload waits
    for others' memory as long as its own body may pause, 60 s by default."""
    service = await make_service(body_idle_timeout=42.0)
    budget = service.client.app[state.BLOBS].decoders
    assert budget is not None and budget.wait == 42.0


async def test_huge_windows_beyond_the_budget_are_503_and_a_normal_upload_goes_through(
    make_service: ServiceFactory, short_wait: None
) -> None:
    service = await make_service()
    budget = service.client.app[state.BLOBS].decoders
    assert budget is not None
    fits = budget.total // HUGE  # 3 with 512 MiB
    assert fits >= 1
    start = huge_window_start()
    held: list[Stalled] = []
    refused: list[Stalled] = []
    try:
        for count in range(1, fits + 1):
            held.append(await Stalled.send(service, start))
            await until(lambda count=count: budget.holders == count)
        assert budget.reserved == fits * HUGE
        assert await metric(service, "larder_upload_decoder_memory_bytes") == fits * HUGE
        assert await metric(service, "larder_upload_decoder_waits_total") == 0
        for _ in range(2):
            refused.append(await Stalled.send(service, start))
        for upload in refused:
            status, head = await upload.answer(5)
            assert status == 503
            assert b"Retry-After: 1" in head
        assert budget.reserved == fits * HUGE
        assert await metric(service, "larder_upload_decoder_waits_total") == 2
        # What Nix sends by default needs a few MiB: it still fits beside them.
        assert await upload_normal_nar(service, os.urandom(300_000)) == 200
        assert budget.reserved == fits * HUGE
        # Stalled uploads whose clients go away give their memory back.
        for upload in held:
            upload.close()
        await until(lambda: budget.reserved == 0 and budget.holders == 0)
        assert await metric(service, "larder_upload_decoder_memory_bytes") == 0
        assert await upload_normal_nar(service, os.urandom(1000)) == 200
    finally:
        for upload in held + refused:
            upload.close()
    await until(lambda: budget.reserved == 0 and budget.holders == 0)


async def test_stalled_uploads_timed_out_give_their_memory_back(
    make_service: ServiceFactory, short_wait: None
) -> None:
    service = await make_service(body_idle_timeout=1.0)
    budget = service.client.app[state.BLOBS].decoders
    assert budget is not None
    uploads = [await Stalled.send(service, huge_window_start()) for _ in range(2)]
    try:
        await until(lambda: budget.holders == 2)
        for upload in uploads:
            status, _ = await upload.answer(10)
            assert status == 408  # body_idle_timeout
        await until(lambda: budget.reserved == 0 and budget.holders == 0)
    finally:
        for upload in uploads:
            upload.close()


async def test_an_upload_that_fails_to_decode_gives_its_memory_back(service: Service) -> None:
    budget = service.client.app[state.BLOBS].decoders
    assert budget is not None
    body = huge_window_start() + b"\xff" * 10  # a reserved block type after the raw blocks
    name = nix32.encode(hashlib.sha256(body).digest())
    resp = await service.client.put(f"/main/nar/{name}.nar.zst", data=body, headers=service.auth())
    assert resp.status == 400
    assert budget.reserved == 0 and budget.holders == 0


async def test_coded_uploads_of_other_routes_are_counted_too(
    make_service: ServiceFactory, short_wait: None
) -> None:
    """A log and a rustc blob in a Content-Encoding: zstd declaring huge windows wait for the
    same budget (one such upload is held; with the budget taken, they are 503)."""
    service = await make_service()
    budget = service.client.app[state.BLOBS].decoders
    assert budget is not None
    fits = budget.total // HUGE
    held = [await Stalled.send(service, huge_window_start()) for _ in range(fits)]
    try:
        await until(lambda: budget.holders == fits)
        frame = (0xFD2FB528).to_bytes(4, "little") + bytes([0x00, (27 - 10) << 3])
        coded = frame + _raw_block(b"log line\n" * 10, last=True)
        headers = {**service.auth(), "Content-Encoding": "zstd"}
        resp = await service.client.put("/main/log/x-a.drv", data=coded, headers=headers)
        assert resp.status == 503
        for upload in held:
            upload.close()
        await until(lambda: budget.reserved == 0)
        resp = await service.client.put("/main/log/x-a.drv", data=coded, headers=headers)
        assert resp.status == 200, await resp.text()
    finally:
        for upload in held:
            upload.close()
    await until(lambda: budget.reserved == 0 and budget.holders == 0)
