"""The short path for narinfo GETs: same answers as the application, counted the same way, and
everything it does not answer is handed to aiohttp on the same connection, in order."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
from dataclasses import replace

import pytest

from larder.core import keys
from larder.core.lastuse import load_uses
from larder.protocol import nix32
from larder.protocol.nar import write_nar
from larder.protocol.tokens import Scope
from larder.service import state
from larder.service.config import Config
from larder.service.errors import RETRY_AFTER_SECONDS
from larder.service.front.connection import FrontProtocol
from larder.service.state import HITS, METRICS, TALLY
from tests.service.conftest import Flaky, Live


class Conn:
    """A raw keep-alive connection that reads whole responses (Content-Length bodies)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, live: Live) -> Conn:
        return cls(*await asyncio.open_connection("127.0.0.1", live.port))

    def send(self, *requests: bytes) -> None:
        self.writer.write(b"".join(requests))

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        status = int((await asyncio.wait_for(self.reader.readline(), 5)).split()[1])
        headers = {}
        while (line := await self.reader.readline()) != b"\r\n":
            name, _, value = line.decode().partition(":")
            headers[name.lower()] = value.strip()
        if status == 100:  # an interim answer to Expect: the real one follows
            return await self.response()
        body = await self.reader.readexactly(int(headers["content-length"]))
        return status, headers, body

    def close(self) -> None:
        self.writer.close()


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nUser-Agent: probe/1\r\n{extra}\r\n".encode()


def put(path: str, body: bytes, token: str) -> bytes:
    head = f"PUT {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


def narinfo_for(store_hash: str, contents: bytes) -> tuple[str, bytes, bytes]:
    nar = write_nar({"type": "regular", "contents": contents})
    digest = nix32.encode(hashlib.sha256(nar).digest())
    narinfo = (
        f"StorePath: /nix/store/{store_hash}-rust_fast-1.0.0\nURL: nar/{digest}.nar\n"
        f"Compression: none\nNarHash: sha256:{digest}\nNarSize: {len(nar)}\nReferences: \n"
    ).encode()
    return digest, nar, narinfo


def hash_of(text: str) -> str:
    return nix32.encode(hashlib.sha256(text.encode()).digest()[:20])


async def place_given_back(live: Live, seconds: float = 30) -> None:
    """Wait until another client is served (not 503) under ``max_connections`` 1: the client
    holding the place lost it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        await asyncio.sleep(0.5)
        other = await Conn.open(live)
        other.send(get("/healthz"))
        status = (await other.response())[0]
        other.close()
        if status == 200:
            return
        assert status == 503
        assert loop.time() < deadline, "the place was never given back"


async def upload(live: Live, conn: Conn, store_hash: str) -> None:
    digest, nar, narinfo = narinfo_for(store_hash, store_hash.encode())
    conn.send(put(f"/main/nar/{digest}.nar", nar, live.token))
    assert (await conn.response())[0] == 200
    conn.send(put(f"/main/{store_hash}.narinfo", narinfo, live.token))
    assert (await conn.response())[0] == 200


async def test_narinfo_gets_are_answered_on_the_short_path_with_the_same_bytes(
    live: Live,
) -> None:
    store_hash = hash_of("a")
    app_conn = await Conn.open(live)
    await upload(live, app_conn, store_hash)  # a PUT: this connection is aiohttp's now
    assert len(live.running.front) == 0
    app_conn.send(get(f"/main/{store_hash}.narinfo"))
    first = await app_conn.response()  # as the application answers
    fast_conn = await Conn.open(live)
    for _ in range(3):
        fast_conn.send(get(f"/main/{store_hash}.narinfo"))
        fast = await fast_conn.response()
        assert fast[0] == 200 and fast[2] == first[2]
        assert {k: v for k, v in fast[1].items() if k != "date"} == {
            k: v for k, v in first[1].items() if k != "date"
        }
    assert len(live.running.front) == 1  # still on the short path
    app_conn.close()
    fast_conn.close()


async def test_lookups_the_memory_lacks_are_made_on_the_short_path(live: Live) -> None:
    store_hash = hash_of("cold")
    app_conn = await Conn.open(live)
    await upload(live, app_conn, store_hash)
    nix = live.app[state.NIX]
    assert nix.served_narinfo(live.main, store_hash) == (False, None)
    fast_conn = await Conn.open(live)
    fast_conn.send(get(f"/main/{store_hash}.narinfo"), get(f"/main/{hash_of('absent')}.narinfo"))
    found, absent = await fast_conn.response(), await fast_conn.response()
    assert found[0] == 200 and f"/nix/store/{store_hash}".encode() in found[2]
    assert absent[0] == 404
    assert live.running.front  # both answered without aiohttp
    assert nix.served_narinfo(live.main, store_hash) == (True, found[2])  # and remembered
    app_conn.close()
    fast_conn.close()


async def test_misses_are_remembered_briefly_and_forgotten_on_upload(live: Live) -> None:
    store_hash = hash_of("later")
    app_conn = await Conn.open(live)
    app_conn.send(get("/healthz"))  # hands this connection over
    await app_conn.response()
    app_conn.send(get(f"/main/{store_hash}.narinfo"))
    slow = await app_conn.response()  # the application answers and remembers the miss
    assert slow[0] == 404
    probe = await Conn.open(live)
    probe.send(get(f"/main/{store_hash}.narinfo"))
    fast = await probe.response()
    assert fast[0] == 404 and fast[2] == slow[2] == b"404: Not Found"
    assert fast[1]["content-type"] == slow[1]["content-type"]
    assert live.running.front  # answered on the short path
    await upload(live, app_conn, store_hash)
    probe.send(get(f"/main/{store_hash}.narinfo"))
    assert (await probe.response())[0] == 200
    app_conn.close()
    probe.close()


async def test_pipelined_requests_are_answered_in_order_across_the_hand_over(live: Live) -> None:
    known, other = hash_of("known"), hash_of("other")
    setup = await Conn.open(live)
    await upload(live, setup, known)
    setup.send(get(f"/main/{known}.narinfo"))
    await setup.response()
    digest, nar, narinfo = narinfo_for(other, b"other")
    conn = await Conn.open(live)
    conn.send(
        get(f"/main/{known}.narinfo"),  # short path
        get("/healthz"),  # hand-over: this and everything after go to aiohttp
        put(f"/main/nar/{digest}.nar", nar, live.token),
        put(f"/main/{other}.narinfo", narinfo, live.token),
        get(f"/main/{other}.narinfo"),
        get(f"/main/{known}.narinfo"),
    )
    answers = [await conn.response() for _ in range(6)]
    assert [a[0] for a in answers] == [200, 200, 200, 200, 200, 200]
    assert answers[0][2] == answers[5][2]
    assert answers[1][2] == b"ok\n"
    assert f"StorePath: /nix/store/{other}".encode() in answers[4][2]
    assert not live.running.front
    setup.close()
    conn.close()


@pytest.mark.parametrize(
    "extra",
    ["Connection: close\r\n", "Content-Length: 3\r\n", "Expect: 100-continue\r\n"],
)
async def test_heads_the_short_path_refuses_go_to_the_application(live: Live, extra: str) -> None:
    store_hash = hash_of("refused")
    setup = await Conn.open(live)
    await upload(live, setup, store_hash)
    setup.send(get(f"/main/{store_hash}.narinfo"))
    await setup.response()
    conn = await Conn.open(live)
    request = get(f"/main/{store_hash}.narinfo", extra)
    conn.send(request + (b"abc" if "Length: 3" in extra else b""))
    assert (await conn.response())[0] == 200
    assert not live.running.front
    setup.close()
    conn.close()


async def test_private_caches_always_take_the_full_path(live: Live) -> None:
    registry = live.app[state.CACHES]
    secret = await registry.create("secret", private=True)
    store_hash = hash_of("private")
    conn = await Conn.open(live)
    digest, nar, narinfo = narinfo_for(store_hash, b"p")
    conn.send(put(f"/secret/nar/{digest}.nar", nar, live.token))
    assert (await conn.response())[0] == 200
    conn.send(put(f"/secret/{store_hash}.narinfo", narinfo, live.token))
    assert (await conn.response())[0] == 200
    reader = await Conn.open(live)
    auth = f"Authorization: Bearer {live.token}\r\n"
    reader.send(get(f"/secret/{store_hash}.narinfo", auth))
    assert (await reader.response())[0] == 200
    anonymous = await Conn.open(live)
    anonymous.send(get(f"/secret/{store_hash}.narinfo"))
    assert (await anonymous.response())[0] == 401  # remembered for the cache, still refused
    assert secret.private and not live.running.front
    for c in (conn, reader, anonymous):
        c.close()


async def test_short_answers_are_counted_logged_and_in_the_hit_statistics(live: Live) -> None:
    store_hash, missing = hash_of("counted"), hash_of("missing")
    setup = await Conn.open(live)
    await upload(live, setup, store_hash)
    for path in (store_hash, missing):
        setup.send(get(f"/main/{path}.narinfo"))
        await setup.response()
    metrics = live.app[METRICS]
    requests = metrics.requests.labels("main", "nix", "2xx")
    lookups_hit = metrics.lookups.labels("main", "nix", "narinfo", "hit", "reader")
    lookups_miss = metrics.lookups.labels("main", "nix", "narinfo", "miss", "reader")
    sent = metrics.sent.labels("main", "nix")
    before = (requests._value.get(), lookups_hit._value.get(), lookups_miss._value.get(),
              sent._value.get())  # fmt: skip
    live.sink.flush()
    lines_before = live.log.getvalue().count("\n")
    conn = await Conn.open(live)
    conn.send(get(f"/main/{store_hash}.narinfo"), get(f"/main/{missing}.narinfo"))
    hit, miss = await conn.response(), await conn.response()
    assert live.running.front
    live.app[TALLY].flush()  # as /metrics and the statistics do before they answer
    assert requests._value.get() == before[0] + 1
    assert lookups_hit._value.get() == before[1] + 1
    assert lookups_miss._value.get() == before[2] + 1
    assert sent._value.get() == before[3] + len(hit[2]) + len(miss[2])
    rates = live.app[HITS].rates("main")["nix"]["hour"]
    assert rates == {"hits": 2, "misses": 2, "hit_rate": 0.5}  # type: ignore[comparison-overlap]
    live.sink.flush()
    lines = live.log.getvalue().splitlines()[lines_before:]
    assert len(lines) == 2
    assert f'"GET /main/{store_hash}.narinfo HTTP/1.1" 200 ' in lines[0]
    assert f'"GET /main/{missing}.narinfo HTTP/1.1" 404 ' in lines[1]
    assert lines[0].endswith('"-" "probe/1"') and " INFO aiohttp.access " in lines[0]
    setup.close()
    conn.close()


async def test_lookups_with_a_write_token_are_counted_as_the_writers(live: Live) -> None:
    """CI's lookups (a token that could write) are told from readers' on this path too, the
    token verified as the application verifies it (8x slower per request when every head with
    credentials went to the application, and each connection stayed with it)."""
    store_hash, missing = hash_of("written"), hash_of("asked-by-ci")
    setup = await Conn.open(live)
    await upload(live, setup, store_hash)
    metrics = live.app[METRICS]

    def counted(result: str, role: str) -> float:
        value: float = metrics.lookups.labels("main", "nix", "narinfo", result, role)._value.get()
        return value

    before = {(r, role): counted(r, role) for r in ("hit", "miss") for role in ("reader", "writer")}
    auth = f"Authorization: Bearer {live.token}\r\n"
    conn = await Conn.open(live)
    for _ in range(2):  # the second time, bytes for both targets are kept
        conn.send(get(f"/main/{store_hash}.narinfo", auth), get(f"/main/{missing}.narinfo", auth))
        assert [(await conn.response())[0] for _ in "ab"] == [200, 404]
        conn.send(get(f"/main/{store_hash}.narinfo"), get(f"/main/{missing}.narinfo"))
        assert [(await conn.response())[0] for _ in "ab"] == [200, 404]
    short = await Conn.open(live)  # a new connection: the short path's until it must hand over
    short.send(get(f"/main/{store_hash}.narinfo", auth), get(f"/main/{missing}.narinfo", auth))
    assert [(await short.response())[0] for _ in "ab"] == [200, 404]
    assert len(live.running.front) == 2  # conn and short: every answer made here
    reader_token, _ = await live.app[state.TOKENS].issue("main", Scope.READ, 3600)
    other = f"Authorization: Bearer {reader_token}\r\n"
    short.send(get(f"/main/{missing}.narinfo", other), get(f"/main/{missing}.narinfo", "X: y\r\n"))
    assert [(await short.response())[0] for _ in "ab"] == [404, 404]
    assert len(live.running.front) == 2  # a new token verified here, no hand-over
    garbage = "Authorization: Bearer not-a-token\r\n"
    short.send(get(f"/main/{store_hash}.narinfo", garbage))  # a public read: still served
    assert (await short.response())[0] == 200
    live.app[TALLY].flush()
    grew = {key: counted(*key) - was for key, was in before.items()}
    assert grew == {("hit", "reader"): 3, ("miss", "reader"): 4, ("hit", "writer"): 3,
                    ("miss", "writer"): 3}  # fmt: skip
    assert live.app[HITS].rates("main")["nix"]["hour"]["misses"] == 4
    setup.close()
    conn.close()
    short.close()


async def test_a_failed_lookup_is_answered_by_the_application(live: Live) -> None:
    storage = live.app[state.STORAGE].inner
    assert isinstance(storage, Flaky)
    storage.down = True
    conn = await Conn.open(live)
    conn.send(get(f"/main/{hash_of('down')}.narinfo"))
    status, headers, _ = await conn.response()
    assert status == 503 and headers["retry-after"] == str(RETRY_AFTER_SECONDS)  # the table
    assert not live.running.front
    conn.close()


async def test_a_client_that_stops_sending_still_gets_its_looked_up_answer(live: Live) -> None:
    store_hash = hash_of("eof")
    setup = await Conn.open(live)
    await upload(live, setup, store_hash)
    storage = live.app[state.STORAGE].inner
    assert isinstance(storage, Flaky)
    storage.delay = 0.3  # the end of the request stream arrives while the lookup runs
    conn = await Conn.open(live)
    conn.send(get(f"/main/{store_hash}.narinfo"))  # not remembered yet: looked up
    conn.writer.write_eof()
    status, _, body = await conn.response()
    assert status == 200 and f"/nix/store/{store_hash}".encode() in body
    assert await asyncio.wait_for(conn.reader.read(), 5) == b""  # then closed
    setup.close()
    conn.close()


async def test_a_client_that_reads_slowly_pauses_the_short_path_then_gets_everything(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    pauses: list[int] = []
    real_pause = FrontProtocol.pause_writing

    def counted(self: FrontProtocol) -> None:
        pauses.append(1)
        real_pause(self)

    monkeypatch.setattr(FrontProtocol, "pause_writing", counted)
    store_hash = hash_of("backlog")
    setup = await Conn.open(live)
    await upload(live, setup, store_hash)
    setup.send(get(f"/main/{store_hash}.narinfo"))
    await setup.response()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", live.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    conn = Conn(reader, writer)
    count = 20_000  # far more answer bytes than the socket buffers hold: writing pauses
    conn.send(get(f"/main/{store_hash}.narinfo") * count, get("/healthz"))
    deadline = asyncio.get_running_loop().time() + 30
    while not pauses:  # the short path fills the buffers (on a busy machine: later), pauses
        assert asyncio.get_running_loop().time() < deadline, "writing never paused"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # ... then hands the rest over
    for _ in range(count):
        assert (await conn.response())[0] == 200
    assert (await conn.response())[2] == b"ok\n"
    conn.send(get("/healthz"))  # aiohttp reads what comes next
    assert (await conn.response())[2] == b"ok\n"
    assert pauses and not live.running.front
    setup.close()
    conn.close()


async def test_narinfos_answered_on_the_short_path_count_as_used(live: Live) -> None:
    store_hash = hash_of("used")
    app_conn = await Conn.open(live)
    await upload(live, app_conn, store_hash)
    await live.app[state.RECORDER].flush()  # the upload recorded nothing
    assert (await load_uses(live.app[state.STORAGE], "main")).times == {}
    fast_conn = await Conn.open(live)
    for _ in range(2):  # a lookup, then an answer from memory
        fast_conn.send(get(f"/main/{store_hash}.narinfo"))
        assert (await fast_conn.response())[0] == 200
    assert live.running.front  # both on the short path
    assert await live.app[state.RECORDER].flush() == 1
    uses = await load_uses(live.app[state.STORAGE], "main")
    assert list(uses.times) == [keys.narinfo("main", store_hash).split("/", 2)[2]]
    # After a collection deletes it, the short path answers 404 at once, not from memory.
    await live.app[state.STORAGE].delete(keys.narinfo("main", store_hash))
    live.app[state.NIX].forget(keys.narinfo("main", store_hash))
    fast_conn.send(get(f"/main/{store_hash}.narinfo"))
    assert (await fast_conn.response())[0] == 404
    app_conn.close()
    fast_conn.close()


@pytest.mark.parametrize("config", [Config(header_timeout=0.3)])
async def test_a_partial_head_behind_an_answer_has_the_head_timeout_too(live: Live) -> None:
    store_hash = hash_of("pipelined")
    app_conn = await Conn.open(live)
    await upload(live, app_conn, store_hash)
    conn = await Conn.open(live)
    conn.send(get(f"/main/{store_hash}.narinfo"), b"GET /main/")  # the rest never comes
    assert (await conn.response())[0] == 200
    assert live.running.front  # answered on the short path
    started = asyncio.get_running_loop().time()
    status, _, body = await conn.response()
    assert status == 408 and b"request head" in body
    assert 0.2 < asyncio.get_running_loop().time() - started < 3
    assert await conn.reader.read() == b""  # closed
    conn.close()
    app_conn.close()


@pytest.mark.parametrize(
    "extra",
    ["Connection: close\r\n", "Content-Length: 3\r\n", "Expect: 100-continue\r\n",
     "transfer-encoding: chunked\r\n", " folded\r\n"],
)  # fmt: skip
async def test_a_target_answered_from_kept_bytes_still_checks_every_new_head(
    live: Live, extra: str
) -> None:
    store_hash = hash_of("kept")
    setup = await Conn.open(live)
    await upload(live, setup, store_hash)
    fast = await Conn.open(live)
    for _ in range(2):  # a lookup, then the kept bytes
        fast.send(get(f"/main/{store_hash}.narinfo"))
        assert (await fast.response())[0] == 200
    assert live.running.front
    other = await Conn.open(live)
    body = b"0\r\n\r\n" if "chunked" in extra else b"abc" if "Length: 3" in extra else b""
    other.send(get(f"/main/{store_hash}.narinfo", extra) + body)
    status = (await other.response())[0]
    assert status in (200, 400)  # the application's answer (it is lenient with odd names) ...
    assert len(live.running.front) == 1  # ... for the head was handed over
    for c in (setup, fast, other):
        c.close()


async def test_an_idle_connection_is_closed_by_the_sweep(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    from larder.service.front import limits as guard

    monkeypatch.setattr(guard, "KEEPALIVE_TIMEOUT", 0.2)
    conn = await Conn.open(live)
    conn.send(get(f"/main/{hash_of('idle')}.narinfo"))
    assert (await conn.response())[0] == 404
    assert live.running.front
    started = asyncio.get_running_loop().time()
    assert await asyncio.wait_for(conn.reader.read(), 5) == b""  # closed by the server
    assert 0.15 < asyncio.get_running_loop().time() - started < 3
    assert not live.running.front
    conn.close()


@pytest.mark.parametrize("config", [Config(), Config(access_log="json")], ids=["text", "json"])
async def test_kept_answers_log_one_line_each_with_their_own_client(live: Live) -> None:
    store_hash = hash_of("logged-kept")
    setup = await Conn.open(live)
    await upload(live, setup, store_hash)
    conn = await Conn.open(live)
    conn.send(get(f"/main/{store_hash}.narinfo"))  # the lookup; the rest are kept bytes
    assert (await conn.response())[0] == 200
    live.sink.flush()
    lines_before = live.log.getvalue().count("\n")
    agents = ["probe/1", "probe/1", "other/2", "probe/1"]
    for agent in agents:
        head = f"GET /main/{store_hash}.narinfo HTTP/1.1\r\nHost: x\r\nUser-Agent: {agent}\r\n\r\n"
        conn.send(head.encode())
        assert (await conn.response())[0] == 200
    live.sink.flush()
    lines = live.log.getvalue().splitlines()[lines_before:]
    assert len(lines) == len(agents)
    for line, agent in zip(lines, agents, strict=True):
        message = line.split(" aiohttp.access ", 1)[1]
        if live.running.runner.app[state.CONFIG].access_log == "json":
            entry = json.loads(message)
            assert (entry["path"], entry["status"], entry["user_agent"]) == (
                f"/main/{store_hash}.narinfo",
                200,
                agent,
            )
            assert entry["seconds"] >= 0
        else:
            assert message.startswith("127.0.0.1 [")
            assert f'"GET /main/{store_hash}.narinfo HTTP/1.1" 200 ' in message
            assert message.endswith(f'"-" "{agent}"')
    setup.close()
    conn.close()


async def test_a_kept_narinfo_follows_a_new_upload_and_a_private_cache_at_once(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    from larder.service.front import short_path as fastpath

    monkeypatch.setattr(fastpath, "RECHECK", 60.0)  # only a change ends the shortcut
    store_hash = hash_of("changing")
    setup = await Conn.open(live)
    await upload(live, setup, store_hash)
    conn = await Conn.open(live)
    first = b""
    for _ in range(3):  # a lookup, a check, then kept bytes without one
        conn.send(get(f"/main/{store_hash}.narinfo"))
        status, _, first = await conn.response()
        assert status == 200
    # The same contents signed by one more key (`nix store sign --store`): served at once.
    _, _, narinfo = narinfo_for(store_hash, store_hash.encode())
    signed = narinfo + b"Sig: ci-1:" + b"A" * 86 + b"==\n"
    setup.send(put(f"/main/{store_hash}.narinfo", signed, live.token))
    assert (await setup.response())[0] == 200
    conn.send(get(f"/main/{store_hash}.narinfo"))
    status, _, again = await conn.response()
    assert status == 200 and again != first and b"Sig: ci-1:" in again
    conn.send(get(f"/main/{store_hash}.narinfo"))
    assert (await conn.response())[2] == again
    caches = live.app[state.CACHES]
    await caches.update(replace(live.main, private=True))
    conn.send(get(f"/main/{store_hash}.narinfo"))
    assert (await conn.response())[0] == 401
    setup.close()
    conn.close()


async def test_a_kept_narinfo_records_its_use_once_per_recheck(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    from larder.service.front import short_path as fastpath

    kept, checked = hash_of("used-kept"), hash_of("used-checked")
    setup = await Conn.open(live)
    await upload(live, setup, kept)
    await upload(live, setup, checked)
    recorder = live.app[state.RECORDER]
    await recorder.flush()
    conn = await Conn.open(live)

    async def answers(store_hash: str, count: int) -> None:
        for _ in range(count):
            conn.send(get(f"/main/{store_hash}.narinfo"))
            assert (await conn.response())[0] == 200

    monkeypatch.setattr(fastpath, "RECHECK", 60.0)
    await answers(kept, 3)
    assert await recorder.flush() == 1
    await answers(kept, 3)  # within RECHECK of the last check: no new use
    assert await recorder.flush() == 0
    monkeypatch.setattr(fastpath, "RECHECK", 0.0)
    await answers(checked, 3)
    assert await recorder.flush() == 1
    await answers(checked, 2)  # no shortcut: each answer is checked, and used
    assert await recorder.flush() == 1
    setup.close()
    conn.close()


async def test_a_connection_reset_before_the_hand_over_logs_nothing(live: Live) -> None:
    """The short path's answer cannot be written (the client reset), then a request for the
    application follows: handing the dying connection to aiohttp made its handler fail an
    assertion, logged as an error for every such connection."""
    import gc
    import struct

    known = hash_of("reset")
    setup = await Conn.open(live)
    await upload(live, setup, known)
    setup.send(get(f"/main/{known}.narinfo"))
    await setup.response()
    setup.close()
    failures: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: failures.append(context))
    try:
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", live.port))
            sock.sendall(
                get("/main/nix-cache-info") + get(f"/main/{known}.narinfo") + get("/healthz")
            )
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # a reset
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
        gc.collect()  # a task's unretrieved exception is reported when it is collected
        await asyncio.sleep(0.1)
    finally:
        loop.set_exception_handler(None)
    assert failures == []
    conn = await Conn.open(live)  # still serving
    conn.send(get(f"/main/{known}.narinfo"))
    assert (await conn.response())[0] == 200
    conn.close()


@pytest.mark.parametrize("config", [Config(max_connections=1)])
async def test_a_client_that_never_reads_its_answers_gives_its_place_back(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client pipelining requests and reading nothing: at its idle deadline the connection was
    closed, and a close waits for the answers to leave, so it stayed open, holding its place
    under ``max_connections`` for good (every other client got 503)."""
    from larder.service.front import limits

    monkeypatch.setattr(limits, "KEEPALIVE_TIMEOUT", 1.0)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", live.port))
    _, writer = await asyncio.open_connection(sock=sock)
    writer.write(get("/main/nix-cache-info") * 20_000)  # far more answers than buffers hold
    await place_given_back(live)
    writer.close()


@pytest.mark.parametrize("config", [Config(max_connections=1, body_idle_timeout=1.0)])
async def test_a_client_that_never_reads_the_applications_answers_gives_its_place_back(
    live: Live,
) -> None:
    """The same client, its requests answered by the application (HEADs): aiohttp waited for
    the answers to leave with no deadline (``drain``), so the connection stayed open for good.
    A connection whose client takes nothing for ``body_idle_timeout`` is dropped."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", live.port))
    _, writer = await asyncio.open_connection(sock=sock)
    head = b"HEAD /main/nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n"
    writer.write(head * 20_000)  # far more answers than buffers hold
    await place_given_back(live)
    writer.close()


@pytest.mark.parametrize("sndbuf", [16 * 1024])
@pytest.mark.parametrize("config", [Config(body_idle_timeout=1.0)])
async def test_a_client_reading_the_applications_answers_in_bursts_gets_them_all(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Taking nothing for most of ``body_idle_timeout``, again and again, is not taking nothing
    for all of it: the send deadline starts again whenever the client takes some, and ends
    when it has taken everything."""
    from larder.service.front.limits import GuardedRequestHandler

    pauses: list[int] = []
    real_pause = GuardedRequestHandler.pause_writing

    def counted(self: GuardedRequestHandler) -> None:
        pauses.append(1)
        real_pause(self)

    monkeypatch.setattr(GuardedRequestHandler, "pause_writing", counted)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", live.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    count = 6_000  # far more answer bytes than the buffers hold: writing pauses
    writer.write(b"HEAD /main/nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n" * count)
    received = bytearray()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while received.count(b"HTTP/1.1 200 OK\r\n") < count:
        assert loop.time() < deadline, f"{received.count(b'HTTP/1.1 200 OK')} answers came"
        await asyncio.sleep(0.6)  # nothing taken for most of the deadline, then a little
        taken = len(received)
        while len(received) - taken < 128 * 1024:
            try:
                chunk = await asyncio.wait_for(reader.read(64 * 1024), 0.1)
            except TimeoutError:
                break
            assert chunk, f"dropped after {received.count(b'HTTP/1.1 200 OK')} answers"
            received += chunk
    assert len(pauses) >= 2
    await asyncio.sleep(1.5)  # an idle keep-alive connection, its client having taken it all
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await Conn(reader, writer).response())[2] == b"ok\n"
    writer.close()
