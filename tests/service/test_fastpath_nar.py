"""The short path for NAR GETs, narinfo HEADs and ``nix-cache-info``: the application's answers,
counted and logged the same way; what it does not take (ranges, conditional requests, misses,
blobs that are not local files) the application answers on the same connection."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import socket
from pathlib import Path
from typing import cast

import pytest
import zstandard

from larder.core import keys
from larder.core.lastuse import load_uses
from larder.protocol import nix32
from larder.protocol.nar import write_nar
from larder.service import state
from larder.service.config import Config
from larder.service.front.limits import ConnectionGuard, Sweeper
from larder.service.state import METRICS, TALLY
from larder.storage.base import Storage
from larder.storage.disk import DiskStorage
from larder.storage.memory import MemoryStorage
from tests.service.conftest import Live
from tests.service.test_fastpath import Conn, get, hash_of, place_given_back, put

CONTENTS = os.urandom(300_000) + b"text " * 50_000


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return DiskStorage(tmp_path / "store")


async def push(live: Live, store_hash: str, contents: bytes = CONTENTS, cache: str = "main") -> str:
    """Upload a zstd NAR and its narinfo; the URL the served narinfo gives for the NAR."""
    nar = write_nar({"type": "regular", "contents": contents})
    upload = zstandard.ZstdCompressor().compress(nar)
    nar_hash = nix32.encode(hashlib.sha256(nar).digest())
    file_hash = nix32.encode(hashlib.sha256(upload).digest())
    narinfo = (
        f"StorePath: /nix/store/{store_hash}-rust_nar-1.0.0\nURL: nar/{file_hash}.nar.zst\n"
        f"Compression: zstd\nNarHash: sha256:{nar_hash}\nNarSize: {len(nar)}\nReferences: \n"
    ).encode()
    conn = await Conn.open(live)
    conn.send(put(f"/{cache}/nar/{file_hash}.nar.zst", upload, live.token))
    assert (await conn.response())[0] == 200
    conn.send(put(f"/{cache}/{store_hash}.narinfo", narinfo, live.token))
    assert (await conn.response())[0] == 200
    auth = f"Authorization: Bearer {live.token}\r\n"
    conn.send(get(f"/{cache}/{store_hash}.narinfo", auth))
    status, _, served = await conn.response()
    assert status == 200
    conn.close()
    url = re.search(rb"^URL: (\S+)$", served, re.M)
    assert url is not None
    return f"/{cache}/{url.group(1).decode()}"


async def application_answer(live: Live, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """``request`` as the application answers it (on a connection already handed over)."""
    conn = await Conn.open(live)
    conn.send(get("/healthz"))
    await conn.response()
    conn.send(request)
    answer = await conn.response()
    conn.close()
    return answer


def without_date(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k != "date"}


async def test_a_nar_get_is_answered_on_the_short_path_as_the_application_answers(
    live: Live,
) -> None:
    url = await push(live, hash_of("nar"))
    expected = await application_answer(live, get(url))
    conn = await Conn.open(live)
    for _ in range(2):  # a NAR, and the same again on the same connection
        conn.send(get(url))
        status, headers, body = await conn.response()
        assert status == 200 and body == expected[2]
        assert without_date(headers) == without_date(expected[1])
    assert zstandard.ZstdDecompressor().decompressobj().decompress(body).startswith(b"\x0d\x00")
    assert len(live.running.front) == 1  # never handed over
    conn.close()


async def test_a_nar_download_with_a_write_token_is_the_writers(live: Live) -> None:
    url = await push(live, hash_of("ci-nar"))
    metrics = live.app[METRICS]
    roles = ("reader", "writer")
    hits = [metrics.lookups.labels("main", "nix", "nar", "hit", role) for role in roles]
    live.app[TALLY].flush()
    before = [hit._value.get() for hit in hits]
    conn = await Conn.open(live)
    for extra in (f"Authorization: Bearer {live.token}\r\n", "", "Authorization: Basic !!\r\n"):
        conn.send(get(url, extra))
        assert (await conn.response())[0] == 200
    assert len(live.running.front) == 1  # all three sent by this path
    live.app[TALLY].flush()
    assert [hit._value.get() - was for hit, was in zip(hits, before, strict=True)] == [2, 1]
    conn.close()


async def test_a_nar_answer_is_counted_logged_and_used(live: Live) -> None:
    url = await push(live, hash_of("counted-nar"))
    metrics = live.app[METRICS]
    hits = metrics.lookups.labels("main", "nix", "nar", "hit", "reader")
    sent = metrics.sent.labels("main", "nix")
    live.app[TALLY].flush()
    before = hits._value.get(), sent._value.get()
    live.sink.flush()
    lines_before = live.log.getvalue().count("\n")
    conn = await Conn.open(live)
    conn.send(get(url))
    body = (await conn.response())[2]
    assert live.running.front
    live.app[TALLY].flush()
    assert hits._value.get() == before[0] + 1
    assert sent._value.get() == before[1] + len(body)
    live.sink.flush()
    lines = live.log.getvalue().splitlines()[lines_before:]
    assert len(lines) == 1 and f'"GET {url} HTTP/1.1" 200 ' in lines[0]
    nar_hash = url.rsplit("/", 1)[1].split(".")[0]
    await live.app[state.RECORDER].flush()
    uses = await load_uses(live.app[state.STORAGE], "main")
    assert keys.nar("main", nar_hash).split("/", 2)[2] in uses.times  # the download is a use
    conn.close()


@pytest.mark.parametrize("sndbuf", [64 * 1024])
async def test_an_abandoned_nar_download_counts_what_was_sent(live: Live) -> None:
    """A client that reads 1 KB of an 8 MiB NAR sent by sendfile and leaves adds about what was
    sent to larder_transfer_sent_bytes_total, not the NAR's length."""
    size = 8 << 20
    url = await push(live, hash_of("abandoned-nar"), os.urandom(size))
    sent = live.app[METRICS].sent.labels("main", "nix")
    live.app[TALLY].flush()
    before = sent._value.get()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", live.port))
    try:
        sock.sendall(get(url))
        sock.settimeout(10)
        assert (await asyncio.to_thread(sock.recv, 1024)).startswith(b"HTTP/1.1 200 ")
        await asyncio.sleep(0.5)  # the server fills what the connection holds, then waits
        assert live.running.front  # sent by this path
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
    for _ in range(50):
        await asyncio.sleep(0.1)
        if not live.running.front:
            break
    live.app[TALLY].flush()
    assert 0 < sent._value.get() - before < size // 4


@pytest.mark.parametrize(
    "extra, status",
    [("Range: bytes=0-99\r\n", 206), ("If-None-Match: *\r\n", 304), ("Connection: close\r\n", 200)],
)
async def test_ranges_and_conditions_go_to_the_application(
    live: Live, extra: str, status: int
) -> None:
    url = await push(live, hash_of(f"range-{status}"))
    conn = await Conn.open(live)
    conn.writer.write(get(url, extra))
    line = await asyncio.wait_for(conn.reader.readline(), 5)
    assert int(line.split()[1]) == status
    assert not live.running.front
    conn.close()


async def test_a_missing_nar_is_the_applications_404(live: Live) -> None:
    absent = "/main/nar/" + nix32.encode(hashlib.sha256(b"absent").digest()) + ".nar.zst"
    conn = await Conn.open(live)
    conn.send(get(absent))
    assert (await conn.response())[0] == 404
    assert not live.running.front
    conn.close()


async def test_pipelined_answers_keep_their_order_behind_a_nar(live: Live) -> None:
    first, second = hash_of("pipe-1"), hash_of("pipe-2")
    url_first, url_second = await push(live, first), await push(live, second, b"other" * 1000)
    conn = await Conn.open(live)
    conn.send(get(url_first), get(f"/main/{second}.narinfo"), get(url_second), get(url_first))
    answers = [await conn.response() for _ in range(4)]
    assert [a[0] for a in answers] == [200, 200, 200, 200]
    assert answers[0][2] == answers[3][2] != answers[2][2]
    assert f"/nix/store/{second}".encode() in answers[1][2]
    assert live.running.front
    conn.close()


async def test_a_client_that_leaves_mid_body_costs_nothing_else(live: Live) -> None:
    url = await push(live, hash_of("leaver"), os.urandom(8_000_000))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", live.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(get(url))
    assert (await asyncio.wait_for(reader.read(100), 5)).startswith(b"HTTP/1.1 200 OK")
    writer.transport.abort()  # gone, with most of the body unsent
    for _ in range(100):
        if not live.running.front:
            break
        await asyncio.sleep(0.05)
    assert not live.running.front  # the connection is gone
    conn = await Conn.open(live)  # and the server goes on
    conn.send(get(url))
    status, headers, body = await conn.response()
    assert status == 200 and len(body) == int(headers["content-length"])
    conn.close()


@pytest.mark.parametrize("storage", [MemoryStorage()])
async def test_blobs_that_are_not_local_files_go_to_the_application(live: Live) -> None:
    url = await push(live, hash_of("memory"))
    for _ in range(2):  # the first finds out, the second does not even look
        conn = await Conn.open(live)
        conn.send(get(url))
        status, _, body = await conn.response()
        assert status == 200 and body
        assert not live.running.front
        conn.close()


def head(path: str) -> bytes:
    return f"HEAD {path} HTTP/1.1\r\nHost: x\r\nUser-Agent: probe/1\r\n\r\n".encode()


async def read_head(conn: Conn) -> tuple[int, dict[str, str]]:
    status = int((await asyncio.wait_for(conn.reader.readline(), 5)).split()[1])
    headers = {}
    while (line := await conn.reader.readline()) != b"\r\n":
        name, _, value = line.decode().partition(":")
        headers[name.lower()] = value.strip()
    return status, headers


async def test_narinfo_heads_are_answered_on_the_short_path_as_the_application_does(
    live: Live,
) -> None:
    present, absent = hash_of("head"), hash_of("no-head")
    await push(live, present)
    app_conn = await Conn.open(live)
    app_conn.send(get("/healthz"))
    await app_conn.response()
    conn = await Conn.open(live)
    for path in (present, absent):
        app_conn.writer.write(head(f"/main/{path}.narinfo"))
        expected = await read_head(app_conn)
        conn.writer.write(head(f"/main/{path}.narinfo"))
        assert await read_head(conn) == (expected[0], {**expected[1], "date": ANY})
    conn.send(get(f"/main/{present}.narinfo"))  # no body came before: this answer is next
    assert (await conn.response())[0] == 200
    assert len(live.running.front) == 1
    app_conn.close()
    conn.close()


class _Any:
    def __eq__(self, other: object) -> bool:
        return True


ANY: str = _Any()  # type: ignore[assignment]


async def test_nix_cache_info_is_answered_on_the_short_path(live: Live) -> None:
    expected = await application_answer(live, get("/main/nix-cache-info"))
    conn = await Conn.open(live)
    conn.send(get("/main/nix-cache-info"))
    status, headers, body = await conn.response()
    assert (status, body) == (200, expected[2]) and body.startswith(b"StoreDir: /nix/store\n")
    assert without_date(headers) == without_date(expected[1])
    assert live.running.front
    conn.close()


@pytest.mark.parametrize("what", ["nix-cache-info", "nar"])
async def test_a_private_caches_answers_need_the_application(live: Live, what: str) -> None:
    await live.app[state.CACHES].create("secret", private=True)
    url = await push(live, hash_of("secret"), cache="secret")  # its NAR is there
    target = "/secret/nix-cache-info" if what == "nix-cache-info" else url
    conn = await Conn.open(live)
    conn.send(get(target))
    assert (await conn.response())[0] == 401
    assert not live.running.front
    conn.close()


def test_the_sweep_spares_a_connection_that_is_busy() -> None:
    class Busy:
        head_since = 0.0
        idle_since = 0.0  # sending: not idle, however long since the last answer
        stalled_since = 0.0
        closed = False

        def close(self) -> None:
            self.closed = True

        def head_timed_out(self) -> None:
            raise AssertionError("no head is incomplete")

    guard = ConnectionGuard(0, 0)
    connection = Busy()
    guard.watched.add(connection)
    Sweeper(guard).sweep()
    assert connection.closed is False


def test_the_head_deadline_waits_while_the_server_is_not_reading() -> None:
    """A client pipelining requests and reading the answers slowly has the server stop reading
    it; the rest of a head then waits on the server, not the client. Its deadline passed all
    the same: the connection was answered 408 and reset under the client, mid-answers."""

    class Transport:
        reading = False

        def is_reading(self) -> bool:
            return self.reading

    class Pipelining:
        head_since = 1.0  # a head began long ago
        idle_since = 0.0
        stalled_since = 0.0
        timed_out = False

        def __init__(self) -> None:
            self.transport = Transport()

        def close(self) -> None:
            raise AssertionError("not idle")

        def head_timed_out(self) -> None:
            self.timed_out = True

    guard = ConnectionGuard(30, 0)
    connection = Pipelining()
    guard.watched.add(connection)
    Sweeper(guard).sweep()
    assert not connection.timed_out and connection.head_since > 1.0  # its time starts again
    connection.transport.reading = True
    connection.head_since = 1.0
    Sweeper(guard).sweep()
    assert connection.timed_out  # reading, and the head still incomplete: the client's delay


async def test_a_nar_blob_of_another_size_than_its_record_goes_to_the_application(
    live: Live, storage: Storage
) -> None:
    """Cut short at rest: the short path sent the remaining bytes as a complete 200 (its own
    shorter length) and logged nothing; the application checks the blob and answers 500."""
    url = await push(live, hash_of("cut-nar"))
    nar_hash = url.rsplit("/", 1)[1].removesuffix(".nar.zst")
    record = await storage.get(keys.nar("main", nar_hash))
    assert isinstance(storage, DiskStorage) and record is not None
    blob = storage._blob_path(json.loads(record)["blob"])
    os.truncate(blob, blob.stat().st_size // 2)
    conn = await Conn.open(live)
    conn.send(get(url))
    status, _, _ = await conn.response()
    conn.close()
    assert status == 500


@pytest.mark.parametrize("sndbuf", [16 * 1024])
@pytest.mark.parametrize("config", [Config(max_connections=1, body_idle_timeout=1.0)])
async def test_a_client_that_reads_nothing_loses_its_place_while_a_nar_head_waits(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NAR's head waits for the answers before it to leave: that wait had no deadline, so a
    client that pipelined requests and read nothing held its connection, and its place under
    ``max_connections``, for good once it asked for a NAR."""
    from larder.service.front import short_path
    from larder.service.front.connection import FrontProtocol

    url = await push(live, hash_of("never-read"))
    made = FrontProtocol.connection_made

    def deep(self: FrontProtocol, transport: asyncio.BaseTransport) -> None:
        made(self, transport)  # answers pile up unsent, short of pausing the connection
        cast(asyncio.WriteTransport, transport).set_write_buffer_limits(high=8 * 1024**2)

    monkeypatch.setattr(FrontProtocol, "connection_made", deep)
    started: list[int] = []
    real = short_path.FastPath.nar_started

    def counted(self: short_path.FastPath, request: object, nar: object) -> None:
        started.append(1)
        real(self, request, nar)  # type: ignore[arg-type]

    monkeypatch.setattr(short_path.FastPath, "nar_started", counted)
    while True:  # until the upload's connection has given its place back
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", live.port))
        _, writer = await asyncio.open_connection(sock=sock)
        await asyncio.sleep(0.1)
        if live.running.front:
            break
        writer.close()
    writer.write(get("/main/nix-cache-info") * 5000 + get(url))
    await place_given_back(live)
    assert started, "the NAR was never asked for"
    writer.close()


@pytest.mark.parametrize("config", [Config(max_connections=1, body_idle_timeout=1.0)])
async def test_a_client_that_stops_reading_a_file_response_loses_its_place(live: Live) -> None:
    """The application's file responses (a range, a private cache's NAR) went out by asyncio's
    own ``loop.sendfile``, which waits for a client that takes nothing for good."""
    url = await push(live, hash_of("stops-reading"), os.urandom(8_000_000))
    while True:  # until the upload's connection has given its place back
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", live.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(get(url, "Range: bytes=0-\r\n"))
        head = await asyncio.wait_for(reader.read(100), 5)
        if head.startswith(b"HTTP/1.1 206 "):
            break
        assert head.startswith(b"HTTP/1.1 503 "), head
        writer.close()
        await asyncio.sleep(0.1)
    await place_given_back(live)
    writer.close()
