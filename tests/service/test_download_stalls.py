"""Downloads sent piece by piece (decoded bodies): a client that stops reading is dropped after
``body_idle_timeout``, one that goes away is not a server error, and either way the decoder and
the open blob are let go at once."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from larder.service import state
from larder.service.config import Config
from larder.service.observability.metrics import NO_CACHE
from larder.service.state import METRICS
from tests.service.conftest import Live

BODY = os.urandom(6 << 20)  # incompressible: the decoded body fills any socket buffer


@pytest.fixture
def config() -> Config:
    return Config(body_idle_timeout=1.0)


async def _stored_log(live: Live, path: str = "/main/log/stall-1.0.drv") -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
    head = (
        f"PUT {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {live.token}\r\n"
        f"Content-Type: text/plain\r\nContent-Length: {len(BODY)}\r\n\r\n"
    )
    writer.write(head.encode() + BODY)
    status = await asyncio.wait_for(reader.readline(), 30)
    writer.close()
    assert status.split()[1] == b"200", status
    return path


def _errors(live: Live) -> float:
    registry = live.app[METRICS].registry
    total = 0.0
    for cache in ("main", NO_CACHE):
        labels = {"cache": cache, "protocol": "nix", "status_class": "5xx"}
        total += registry.get_sample_value("larder_http_requests_total", labels) or 0.0
    return total


def _stalled_get(port: int, path: str) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())  # no zstd: decoded
    return sock


async def test_a_client_that_stops_reading_is_dropped(live: Live) -> None:
    path = await _stored_log(live)
    sock = _stalled_get(live.port, path)
    try:
        await asyncio.sleep(4)  # well past the 1 s idle limit
        sock.settimeout(10)
        received = 0
        try:
            while data := sock.recv(1 << 20):
                received += len(data)
        except ConnectionResetError:
            pass  # dropped without flushing what it had queued
        assert received < len(BODY)  # the server gave up on it rather than sending it all
    finally:
        sock.close()
    assert _errors(live) == 0


async def test_a_client_gone_mid_download_is_not_a_server_error(live: Live) -> None:
    path = await _stored_log(live)
    for _ in range(3):
        sock = _stalled_get(live.port, path)
        await asyncio.sleep(0.3)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()  # a reset
    await asyncio.sleep(1)
    assert _errors(live) == 0


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


@pytest.mark.parametrize("sndbuf", [64 * 1024])
async def test_sent_bytes_are_what_went_out_not_the_declared_length(live: Live) -> None:
    """A client that reads 1 KB of a 6 MiB download and leaves adds about what was written to
    its connection to larder_transfer_sent_bytes_total, not 6 MiB; a whole one adds its body."""
    path = await _stored_log(live)
    sent = live.app[METRICS].sent.labels("main", "nix")
    before = sent._value.get()
    reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    answer = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    body = answer.split(b"\r\n\r\n", 1)[1]
    assert body == BODY
    assert sent._value.get() - before == len(BODY)

    before = sent._value.get()
    sock = _stalled_get(live.port, path)
    try:
        sock.settimeout(10)
        assert await asyncio.to_thread(sock.recv, 1024)
        await asyncio.sleep(0.5)  # the server fills what the connection holds, then waits
    finally:
        _reset(sock)
    await asyncio.sleep(0.5)
    assert 0 < sent._value.get() - before < len(BODY) // 4


async def test_a_client_gone_before_the_headers_is_not_a_server_error(live: Live) -> None:
    """The client sends its GET and closes at once: the headers cannot be written."""
    path = await _stored_log(live)
    for _ in range(5):
        sock = socket.create_connection(("127.0.0.1", live.port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        sock.close()
    await asyncio.sleep(1)
    assert _errors(live) == 0
    assert " 500 " not in live.log.getvalue()


async def test_large_decoded_downloads_beyond_the_limit_wait_their_turn(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each decoded download holds a decoder while its client reads: past a cache's limit one
    more waits for a slot, then is 503 with Retry-After before anything is decoded. Another
    cache's downloads are not held up, and a slot freed is used again."""
    from larder.service.routes import bodies

    monkeypatch.setattr(bodies, "MAX_LARGE_GENERATED", 1)
    monkeypatch.setattr(bodies, "SLOT_WAIT", 0.5)
    path = await _stored_log(live)
    await live.app[state.CACHES].ensure("team")
    other = await _stored_log(live, "/team/log/stall-1.0.drv")

    async def get(target: str) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
        writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        return answer

    holder = _stalled_get(live.port, path)  # takes main's one slot, reads nothing
    try:
        await asyncio.sleep(0.3)
        busy = await get(path)
        assert busy.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in busy, busy[:200]
        assert (await get(other)).endswith(BODY)  # another cache: its own slots
        waiting = asyncio.create_task(get(path))
        await asyncio.sleep(0.1)
    finally:
        holder.close()  # the stalled download ends: the waiting one gets its slot
    assert (await waiting).endswith(BODY)
    assert " ERROR " not in live.log.getvalue()
