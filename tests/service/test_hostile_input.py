"""Hostile input through the real HTTP stack: random narinfo bodies, random request targets and
credentials never crash a route (no 5xx) and never leave a stored object that should not exist.

Hypothesis drives each property from a worker thread; every request runs on the test's own
event loop against the in-process server.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import logging
import lzma
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from larder.core import keys
from larder.protocol import narinfo, nix32
from larder.service import state
from larder.storage.disk import DiskStorage
from tests.service.conftest import Service, ServiceFactory, capturing_logger, send_raw
from tests.service.test_nix_routes import hash_part, make_nar, nar_url, narinfo_text, store_path

T = TypeVar("T")
EXAMPLES = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


def on_loop(loop: asyncio.AbstractEventLoop) -> Callable[[Coroutine[Any, Any, T]], T]:
    """Run a coroutine on ``loop`` from another thread and wait for its result."""
    return lambda coro: asyncio.run_coroutine_threadsafe(coro, loop).result(30)


async def all_keys(service: Service) -> set[str]:
    return {key async for key in service.storage.keys("")}


# A valid narinfo, then edits that keep it close to valid, so most bodies get past the parser
# and reach the checks against the cache.
PATH = store_path("hostile-1.0")
OTHER = store_path("elsewhere-1.0")
NAR = make_nar(b"hostile" * 50)
LINES = narinfo_text(PATH, NAR, [PATH]).decode().splitlines(keepends=True)
values = st.one_of(
    st.sampled_from(
        [PATH, OTHER, "0", "1", str(len(NAR)), str(len(NAR) + 1), "-1", "sha256:", "xz",
         "sha256:" + nix32.encode(hashlib.sha256(NAR).digest()), hashlib.sha256(NAR).hexdigest(),
         f"{PATH.rsplit('/', 1)[1]} {OTHER.rsplit('/', 1)[1]}", "k:" + "A" * 86 + "==", ""]
    ),
    st.text(max_size=40),
)  # fmt: skip
edits = st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 10)),
    st.tuples(st.just("dup"), st.integers(0, 10)),
    st.tuples(st.just("value"), st.integers(0, 10), values),
    st.tuples(st.just("line"), st.integers(0, 10), st.text(max_size=60)),
    st.tuples(st.just("bytes"), st.integers(0, 10), st.binary(max_size=30)),
)


def edited(changes: list[tuple[Any, ...]]) -> bytes:
    lines = [line.encode() for line in LINES]
    for change in changes:
        kind, where = change[0], change[1] % max(len(lines), 1)
        if not lines:
            break
        if kind == "drop":
            del lines[where]
        elif kind == "dup":
            lines.insert(where, lines[where])
        elif kind == "value":
            key = lines[where].split(b":", 1)[0]
            lines[where] = key + b": " + change[2].encode("utf-8", "surrogatepass") + b"\n"
        elif kind == "line":
            lines.insert(where, change[2].encode("utf-8", "surrogatepass") + b"\n")
        else:
            lines.insert(where, change[2])
    return b"".join(lines)


bodies = st.one_of(st.lists(edits, max_size=4).map(edited), st.binary(max_size=400))


async def test_random_narinfo_bodies_store_only_valid_narinfos(service: Service) -> None:
    compressed = lzma.compress(NAR)
    resp = await service.client.put(
        f"/main/{nar_url(compressed)}", data=compressed, headers=service.auth()
    )
    assert resp.status == 200
    target = f"/main/{hash_part(PATH)}.narinfo"
    key = keys.narinfo("main", hash_part(PATH))
    baseline = await all_keys(service)
    run = on_loop(asyncio.get_running_loop())
    outcomes: dict[int, int] = {}

    async def put(body: bytes) -> tuple[int, set[str]]:
        await service.storage.delete(key)
        resp = await service.client.put(target, data=body, headers=service.auth())
        await resp.read()
        return resp.status, await all_keys(service)

    @EXAMPLES
    @given(bodies)
    def check(body: bytes) -> None:
        status, after = run(put(body))
        outcomes[status] = outcomes.get(status, 0) + 1
        assert status in (200, 400), (status, body)
        assert after - baseline <= {key}, after - baseline
        if status != 200:
            assert key not in after, body
            return
        info = narinfo.parse(body)  # what was accepted parses, and is this NAR at this path
        assert info.store_path.full == PATH
        assert info.nar_hash.digest == hashlib.sha256(NAR).digest()
        assert info.nar_size == len(NAR)
        assert {ref.full for ref in info.references} <= {PATH}
        stored = run(service.storage.get(key))
        assert stored is not None and narinfo.parse(stored).store_path.full == PATH

    await asyncio.to_thread(check)
    assert outcomes.get(200) and outcomes.get(400), outcomes  # both sides were exercised


# Request targets built from the pieces traversal and encoding tricks are made of.
pieces = st.sampled_from(
    ["main", "sccache", "log", "nar", "..", ".", "%2e%2e", "%2E", "%2f", "%2F", "%00", "%5c", "\\",
     "//", "/", "a", "x.drv", "%3F", "?", "#", "%", "%zz", "%c3%a9", "é", ";", "@", ":", "!",
     "config", "token-secret", "caches", "0" * 32 + ".narinfo", "0" * 52 + ".nar"]
)  # fmt: skip
targets = st.lists(pieces, min_size=1, max_size=8).map(lambda parts: "/" + "".join(parts))


async def test_random_targets_never_crash_or_escape_the_cache(service: Service) -> None:
    baseline = await all_keys(service)
    run = on_loop(asyncio.get_running_loop())

    async def put(method: str, target: str) -> tuple[int, set[str]]:
        head = (
            f"{method} {target} HTTP/1.1\r\n"
            f"Authorization: Bearer {service.write_token}\r\nContent-Length: 5\r\n"
        )
        status = await send_raw(service, head, b"hello")
        return status, await all_keys(service)

    @EXAMPLES
    @given(st.sampled_from(["GET", "PUT", "PROPFIND", "MKCOL", "DELETE"]), targets)
    def check(method: str, target: str) -> None:
        status, after = run(put(method, target))
        assert status < 500, (method, target, status)
        for new in after - baseline:
            assert new.startswith("caches/main/"), (target, new)

    await asyncio.to_thread(check)


async def test_question_mark_in_a_build_log_name_round_trips(service: Service) -> None:
    # Store path names may contain '?'; this was a 500 (the storage key refused it).
    target = "/main/log/abc-what%3F.drv"
    head = f"PUT {target} HTTP/1.1\r\nAuthorization: Bearer {service.write_token}\r\n"
    assert await send_raw(service, head + "Content-Length: 3\r\n", b"log") == 200
    assert await send_raw(service, f"GET {target} HTTP/1.1\r\n") == 200
    assert "caches/main/file/log/abc-what?.drv" in await all_keys(service)


async def test_undecodable_bearer_bytes_are_401_not_500(service: Service) -> None:
    await service.client.app[state.CACHES].create("secret", private=True)
    reader, writer = await asyncio.open_connection(service.client.host, service.client.port)
    writer.write(
        b"GET /secret/nix-cache-info HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe.a.b\r\n"
        b"Connection: close\r\n\r\n"
    )
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert line.split()[1] == b"401", line


async def test_names_disk_storage_cannot_hold_are_refused_not_500(
    make_service: ServiceFactory, tmp_path: Path
) -> None:
    """A segment longer than a file name may be is 400 on every backend; on disk, a name used
    both as an entry and as a collection of entries is 409. Neither stores anything."""
    service = await make_service(DiskStorage(tmp_path / "data"))

    async def put(target: str) -> int:
        head = (
            f"PUT {target} HTTP/1.1\r\n"
            f"Authorization: Bearer {service.write_token}\r\nContent-Length: 5\r\n"
        )
        return await send_raw(service, head, b"hello")

    baseline = await all_keys(service)
    assert await put(f"/main/sccache/{'x' * 256}/entry") == 400
    assert await put(f"/main/log/{'x' * 256}") == 400
    assert await all_keys(service) == baseline
    assert await put("/main/sccache/a/e") == 201
    stored = await all_keys(service)
    assert await put("/main/sccache/a/e/child") == 409
    assert await put("/main/sccache/a") == 409
    assert await put("/main/log/l/x") in (200, 201)
    assert await put("/main/log/l") == 409
    assert await put("/main/log/l/x/y") == 409
    assert await all_keys(service) - stored == {"caches/main/file/log/l/x"}


async def test_more_than_one_authorization_header_is_refused(service: Service) -> None:
    """Whichever one larder read, a proxy in front might read the other: neither order works."""
    good, bad = f"Bearer {service.write_token}", "Bearer not-a-token"
    baseline = await all_keys(service)
    for first, second in ((good, bad), (bad, good)):
        head = (
            "PUT /main/log/twice HTTP/1.1\r\n"
            f"Authorization: {first}\r\nAuthorization: {second}\r\nContent-Length: 5\r\n"
        )
        assert await send_raw(service, head, b"hello") == 400
    assert await all_keys(service) == baseline
    head = f"PUT /main/log/twice HTTP/1.1\r\nAuthorization: {good}\r\nContent-Length: 5\r\n"
    assert await send_raw(service, head, b"hello") == 200


async def test_a_body_in_a_transfer_coding_other_than_chunked_is_refused(service: Service) -> None:
    """aiohttp reads ``gzip, chunked`` as chunked and hands over the coded bytes, which would be
    stored as they came; such a body is refused before any route reads it."""
    coded = gzip.compress(b"cached output")
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(coded), coded)
    baseline = await all_keys(service)
    for codings in ("gzip, chunked", "identity, chunked", "deflate,chunked"):
        head = (
            "PUT /main/sccache/t/e/entry HTTP/1.1\r\n"
            f"Authorization: Bearer {service.write_token}\r\nTransfer-Encoding: {codings}\r\n"
        )
        assert await send_raw(service, head, body) == 400, codings
    # TE is what the client accepts in answers, not how its request came
    assert (
        await send_raw(service, "GET /main/nix-cache-info HTTP/1.1\r\nTE: gzip, chunked\r\n") == 200
    )
    assert await all_keys(service) == baseline
    head = (
        "PUT /main/sccache/t/e/entry HTTP/1.1\r\n"
        f"Authorization: Bearer {service.write_token}\r\nTransfer-Encoding: chunked\r\n"
    )
    assert await send_raw(service, head, body) == 201


async def test_a_path_cannot_write_a_line_of_its_own_into_the_log(service: Service) -> None:
    logger, messages = capturing_logger("larder.http")
    try:
        forged = "%0A2026-12-06%2000:00:00,000%20ERROR%20larder.http%20crashed%1B[31m"
        assert await send_raw(service, f"PUT /main/rustc/blobs/x{forged} HTTP/1.1\r\n") == 401
    finally:
        logger.propagate = True
        logger.handlers.clear()
        logger.setLevel(logging.NOTSET)
    assert messages and all("\n" not in m and "\x1b" not in m for m in messages), messages
    assert any("x\\n2026-12-06" in m for m in messages), messages


async def test_a_partial_write_is_refused_and_stores_nothing(service: Service) -> None:
    """RFC 9110 §14.5: a PUT with Content-Range, on a server without partial PUT, is 400 (it was
    stored as the whole entry)."""
    baseline = await all_keys(service)
    for target in ("/main/sccache/p/a/entry", "/main/log/partial"):
        head = (
            f"PUT {target} HTTP/1.1\r\nAuthorization: Bearer {service.write_token}\r\n"
            "Content-Range: bytes 100-103/2000\r\nContent-Length: 4\r\n"
        )
        assert await send_raw(service, head, b"part") == 400
    assert await all_keys(service) == baseline
