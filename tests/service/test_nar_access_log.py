"""The access log states the bytes a NAR answer actually sent (head and body), on the short path
and on aiohttp's, in both layouts and on both event loops: the body leaves by ``sendfile(2)``,
outside aiohttp's writer, and used to be left out (a 200 MiB NAR logged as 258 bytes)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from larder.protocol import nix32
from larder.protocol.nar import write_nar
from larder.protocol.tokens import Scope
from larder.service import state
from larder.service.app import build_app
from larder.service.config import Config
from larder.service.observability.access_log import LineSink
from larder.service.server import start
from larder.storage.disk import DiskStorage
from tests.service.test_sendfile import request

Runner = Callable[[Coroutine[Any, Any, None]], None]


def _logged_bytes(line: str, layout: str) -> int:
    if layout == "json":
        return int(json.loads(line)["bytes"])
    return int(line.split('" ', 1)[1].split()[1])  # `"GET ... HTTP/1.1" 200 <bytes> ...`


@pytest.mark.parametrize("layout", ["text", "json"])
@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_a_nar_line_states_the_bytes_sent(tmp_path: Path, layout: str, run: Runner) -> None:
    nar = write_nar({"type": "regular", "contents": os.urandom(3 * 1024 * 1024)})
    digest = nix32.encode(hashlib.sha256(nar).digest())
    access = logging.getLogger("aiohttp.access")
    level = access.level
    access.setLevel(logging.INFO)  # as `larder serve` configures it
    log = io.StringIO()

    async def main() -> None:
        config = Config(access_log=layout)
        app = build_app(config, DiskStorage(tmp_path / "data"))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        sink = LineSink(log)
        running = await start(config, app, sock, sink)
        try:
            await app[state.CACHES].ensure("main")
            token, _ = await app[state.TOKENS].issue("main", Scope.WRITE, 60)
            head = f"PUT /main/nar/{digest}.nar HTTP/1.1\r\nAuthorization: Bearer {token}\r\n"
            assert (await request(port, f"{head}Content-Length: {len(nar)}\r\n", nar))[0] == 200
            url = f"/main/nar/{digest}.nar.zst"
            sink.flush()
            log.truncate(0)
            log.seek(0)
            sizes = []
            for extra in ("", "X-Via: aiohttp\r\nConnection: close\r\n"):  # short path, aiohttp
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(f"GET {url} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
                head_bytes = await reader.readuntil(b"\r\n\r\n")
                length = int(head_bytes.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                body = await reader.readexactly(length)
                sizes.append((len(head_bytes), len(body)))
                writer.close()
                await asyncio.sleep(0.05)
            sink.flush()
            lines = [line for line in log.getvalue().splitlines() if url in line]
            assert len(lines) == 2, lines
            for line, (head_size, body_size) in zip(lines, sizes, strict=True):
                logged = _logged_bytes(line.split(" aiohttp.access ", 1)[1], layout)
                assert logged == head_size + body_size, (line, head_size, body_size)
            assert running.front == set()  # the second went to aiohttp
        finally:
            await running.stop()

    try:
        run(main())
    finally:
        access.setLevel(level)
