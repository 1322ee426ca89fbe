"""A client that pipelines narinfo GETs, then a NAR GET, stops reading and keeps sending: the
server's memory stays bounded (reading pauses while the NAR is in flight)."""

from __future__ import annotations

import hashlib
import os
import re
import selectors
import socket
import time
from pathlib import Path

from larder.protocol import nix32
from larder.protocol.nar import write_nar
from tests.e2e.harness import Larder, http, larder_server

CONNECTIONS = 3
PIPELINED = 5_000
SEND_BUDGET = 96 * 1024 * 1024  # bytes each connection tries to send after the NAR GET
SEND_SECONDS = 8.0
NAR_SIZE = 48 * 1024 * 1024  # far more than loopback socket buffers hold


def _rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    assert match is not None
    return int(match.group(1)) / 1024


def _push(server: Larder) -> tuple[str, str]:
    """Upload a large NAR and its narinfo; the narinfo's and the NAR's targets."""
    token = server.token()
    nar = write_nar({"type": "regular", "contents": os.urandom(NAR_SIZE)})
    digest = nix32.encode(hashlib.sha256(nar).digest())
    store_hash = nix32.encode(hashlib.sha256(b"front-memory").digest()[:20])
    narinfo = (
        f"StorePath: /nix/store/{store_hash}-big-1.0\nURL: nar/{digest}.nar\n"
        f"Compression: none\nNarHash: sha256:{digest}\nNarSize: {len(nar)}\nReferences: \n"
    ).encode()
    assert http("PUT", f"{server.url}/main/nar/{digest}.nar", nar, token)[0] == 200
    assert http("PUT", f"{server.url}/main/{store_hash}.narinfo", narinfo, token)[0] == 200
    status, served = http("GET", f"{server.url}/main/{store_hash}.narinfo")
    assert status == 200
    url = re.search(rb"^URL: (\S+)$", served, re.M)
    assert url is not None
    return f"/main/{store_hash}.narinfo", f"/main/{url.group(1).decode()}"


def _attack(host: str, port: int, narinfo: str, nar: str) -> int:
    """Open the connections, send each its pipeline, then keep sending without reading until
    the budget or the time is spent; the bytes sent after the NAR GETs in all."""
    request = f"GET {narinfo} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    opening = request * PIPELINED + f"GET {nar} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    more = request * 2048
    selector = selectors.DefaultSelector()
    left: dict[socket.socket, memoryview] = {}
    sent_more: dict[socket.socket, int] = {}
    for _ in range(CONNECTIONS):
        sock = socket.create_connection((host, port))
        sock.setblocking(False)
        left[sock] = memoryview(opening)
        sent_more[sock] = 0
        selector.register(sock, selectors.EVENT_WRITE)
    deadline = time.monotonic() + SEND_SECONDS
    while time.monotonic() < deadline and selector.get_map():
        for key, _ in selector.select(0.1):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if not left[sock]:
                if sent_more[sock] >= SEND_BUDGET:
                    selector.unregister(sock)
                    continue
                left[sock] = memoryview(more)
            try:
                count = sock.send(left[sock])
            except BlockingIOError:
                continue
            if left[sock].obj is more:
                sent_more[sock] += count
            left[sock] = left[sock][count:]
    for sock in sent_more:
        sock.close()
    return sum(sent_more.values())


def test_pipelining_behind_a_nar_in_flight_holds_bounded_memory(tmp_path: Path) -> None:
    with larder_server(str(tmp_path / "data"), tmp_path) as server:
        narinfo, nar = _push(server)
        host, port = server.url.removeprefix("http://").split(":")
        before = _rss_mib(server.pid)
        sent = _attack(host, int(port), narinfo, nar)
        grown = _rss_mib(server.pid) - before
        assert http("GET", f"{server.url}{narinfo}")[0] == 200  # still serving
    # Before reading paused under a NAR in flight, the server read every byte sent (hundreds of
    # MiB); now it stops reading and the kernel's buffers make the client wait.
    assert grown < 48, f"RSS grew by {grown:.0f} MiB after {sent >> 20} MiB sent"
    assert sent < CONNECTIONS * SEND_BUDGET / 4, sent
