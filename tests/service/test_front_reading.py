"""One reading of every request head: what aiohttp refuses, the short path never answers.

A head llhttp (strict) or aiohttp's limits refuse goes to aiohttp untouched, which answers 400
and closes, so a body can never be read as the next request (request smuggling), and oversized
heads are refused as aiohttp refuses them. The short path remembers nothing per distinct head.
"""

from __future__ import annotations

import asyncio
import re
import tracemalloc

import pytest

from larder.service.front.connection import FrontProtocol
from tests.service.conftest import Live
from tests.service.test_fastpath import Conn, get, hash_of, narinfo_for, put, upload

SMUGGLED = b"GET /main/nix-cache-info?smuggled=1 HTTP/1.1\r\nHost: x\r\n\r\n"


async def _everything(live: Live, *sends: bytes) -> bytes:
    """What the server sends for ``sends`` (each written once the server has answered the one
    before) until it closes the connection (or 5 s pass)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
    reply = b""
    try:
        for data in sends[:-1]:
            writer.write(data)
            reply += await asyncio.wait_for(reader.readuntil(b"\nReferences: \n"), 5)
            reply += await asyncio.wait_for(reader.readuntil(b"==\n"), 5)  # the signature
        writer.write(sends[-1])
        try:
            return reply + await asyncio.wait_for(reader.read(), 5)
        except TimeoutError:
            return reply + await reader.read(1 << 20)
    finally:
        writer.close()


def _statuses(reply: bytes) -> list[bytes]:
    """The status of each answer (aiohttp answers a head it cannot read as HTTP/1.0)."""
    return re.findall(rb"(?:^|\n)HTTP/1\.[01] (\d{3}) ", reply)


@pytest.mark.parametrize(
    "field",
    [
        b"Content-Length : %d",
        b"Content-Length\t: %d",
        b"Transfer-Encoding\t: chunked",
        b"Transfer-Encoding : chunked",
        b"X-Pad: a\nContent-Length: %d",
        b"X-Pad: a\rContent-Length: %d",
        b"Content\x00Length: %d",
        b"Content\x01Length: %d",
        b"Content-Length: %d\r\nContent-Length: 0",
    ],
    ids=["space", "tab", "te-tab", "te-space", "bare-lf", "bare-cr", "nul", "ctl", "twice"],
)
async def test_a_body_behind_a_malformed_field_is_never_answered_as_a_request(
    live: Live, field: bytes
) -> None:
    store_hash = hash_of("smuggle")
    setup = await Conn.open(live)
    await upload(live, setup, store_hash)
    setup.close()
    if b"chunked" in field:
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)
    else:
        body, field = SMUGGLED, field.replace(b"%d", str(len(SMUGGLED)).encode())
    head = b"GET /main/%s.narinfo HTTP/1.1\r\nHost: x\r\n%s\r\n\r\n" % (store_hash.encode(), field)
    warm = get(f"/main/{store_hash}.narinfo")  # the target has kept bytes
    reply = await _everything(live, warm, head + body)
    statuses = _statuses(reply)
    assert statuses[0] == b"200"
    assert statuses[1:] == [b"400"], reply  # aiohttp's answer, and then the connection closes
    assert b"smuggled" not in reply and b"StoreDir" not in reply


@pytest.mark.parametrize(
    "extra",
    [
        "X-Big: " + "a" * 60_000 + "\r\n",
        "".join(f"X-F{i}: v\r\n" for i in range(500)),
        "X-Big: " + "a" * 8_200 + "\r\n",
    ],
    ids=["60-KB-field", "500-fields", "8-KB-field"],
)
async def test_heads_aiohttp_refuses_are_refused(live: Live, extra: str) -> None:
    store_hash = hash_of("big-head")
    setup = await Conn.open(live)
    await upload(live, setup, store_hash)
    setup.send(get(f"/main/{store_hash}.narinfo"))
    assert (await setup.response())[0] == 200
    setup.close()
    reply = await _everything(live, get(f"/main/{store_hash}.narinfo", extra))
    assert _statuses(reply)[:1] in ([b"400"], [b"431"]), reply[:200]


async def test_distinct_heads_of_a_kept_target_are_not_remembered(live: Live) -> None:
    store_hash = hash_of("many-heads")
    conn = await Conn.open(live)
    await upload(live, conn, store_hash)
    conn.close()
    conn = await Conn.open(live)
    conn.send(get(f"/main/{store_hash}.narinfo"))
    assert (await conn.response())[0] == 200
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(1_000):
            conn.send(get(f"/main/{store_hash}.narinfo", f"X-Pad: {i} {'p' * 6000}\r\n"))
            assert (await conn.response())[0] == 200
        live.sink.flush()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert live.running.front  # answered on the short path
    assert grown < 2 * 1024 * 1024, grown  # 1,000 heads of 6 KB each were not kept
    conn.close()


class _Quiet(asyncio.Transport):
    """A transport whose client reads nothing: what is written stays with it."""

    def __init__(self) -> None:
        super().__init__()
        self.written = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += len(data)

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def test_a_long_pipeline_holds_its_bytes_not_their_reading(live: Live) -> None:
    protocol = FrontProtocol(live.running.runner.server, live.running.fast, set())
    transport = _Quiet()
    protocol.connection_made(transport)
    protocol.pause_writing()  # the client takes nothing: every request waits
    data = get(f"/main/{hash_of('pipelined')}.narinfo") * 4_000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        protocol.data_received(data)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert transport.written == 0
    assert grown < 2 * len(data), (grown, len(data))  # the bytes, not a reading of each head
    protocol.connection_lost(None)


@pytest.mark.parametrize(
    "upgrade",
    [
        b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n",
        # what `curl --http2 http://...` sends with its first request
        b"Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAA\r\n",
    ],
    ids=["websocket", "h2c"],
)
async def test_an_upgrade_larder_does_not_speak_is_answered_in_http_1_1(
    live: Live, upgrade: bytes
) -> None:
    """RFC 9110 §7.8: a server ignores an ``Upgrade`` it does not take and answers as usual
    (the connection used to close without an answer, a traceback in the log)."""
    store_hash = hash_of("upgrade")
    conn = await Conn.open(live)
    await upload(live, conn, store_hash)
    conn.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
    target = f"/main/{store_hash}.narinfo".encode()
    writer.write(b"GET %s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (target, upgrade))
    reply = await asyncio.wait_for(reader.readuntil(b"==\n"), 5)  # up to the signature
    # the next request on the connection, sent once the answer came (as curl does)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    reply += await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert _statuses(reply) == [b"200", b"200"], reply
    assert b"StorePath: /nix/store/" + store_hash.encode() in reply
    digest, nar, _ = narinfo_for(store_hash, b"sent with an upgrade")
    conn = await Conn.open(live)
    conn.send(
        put(f"/main/nar/{digest}.nar", nar, live.token).replace(b"\r\n", b"\r\n" + upgrade, 1)
    )
    assert (await conn.response())[0] == 200
    conn.send(get(f"/main/nar/{digest}.nar"))
    assert (await conn.response())[2] == nar
    conn.close()
    assert "Traceback" not in live.log.getvalue()


async def test_connect_is_refused_with_an_answer(live: Live) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
    writer.write(b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\n\r\n")
    reply = await asyncio.wait_for(reader.read(4096), 5)
    writer.close()
    assert _statuses(reply)[0].startswith(b"4"), reply


@pytest.mark.parametrize("host", [b"a b", b'x"<script>', b"[::1", b"h:99999", b"a/b"])
async def test_a_host_that_is_no_host_is_refused(live: Live, host: bytes) -> None:
    """RFC 9112 §3.2: 400, on the short path's targets too (a kept narinfo answer) and on the
    API, which wrote the value into the substituter URL it answers."""
    store_hash = hash_of("host")
    conn = await Conn.open(live)
    await upload(live, conn, store_hash)
    conn.close()
    narinfo = f"/main/{store_hash}.narinfo".encode()
    warm = await _everything(
        live,
        get(narinfo.decode()) + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert _statuses(warm) == [b"200", b"200"]
    for target in (narinfo, b"/api/v1/caches/main"):
        reply = await _everything(live, b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, host))
        assert _statuses(reply) == [b"400"], reply
        assert b"StorePath" not in reply and b"substituter" not in reply
    good = await _everything(
        live, b"GET /api/v1/caches/main HTTP/1.1\r\nHost: [::1]:8080\r\nConnection: close\r\n\r\n"
    )
    assert _statuses(good) == [b"200"] and b"http://[::1]:8080/main" in good


@pytest.mark.parametrize("target", [b"*main/x.narinfo", b"main/x.narinfo", b"http:///x", b"*"])
async def test_a_target_aiohttp_refuses_refuses_the_whole_piece(live: Live, target: bytes) -> None:
    """aiohttp refuses a piece holding a request target it does not read, answering none of the
    requests before it in that piece (400 and close); the short path must not answer them."""
    store_hash = hash_of("target")
    conn = await Conn.open(live)
    await upload(live, conn, store_hash)
    conn.close()
    good = get(f"/main/{store_hash}.narinfo")
    warm = await _everything(
        live, good + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert _statuses(warm) == [b"200", b"200"]
    reply = await _everything(
        live, good * 3 + b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % target + good
    )
    assert _statuses(reply) == [b"400"], reply
