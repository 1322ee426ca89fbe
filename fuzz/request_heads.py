"""Fuzz target: the short path's reading of request bytes against aiohttp's (differential).

Input layout: the bytes a client sends on one connection (random and mutated heads, pipelined
requests, bodies). They go, in one piece and then again split at a point the first byte picks, to
two connections of the same application (memory storage, public cache ``main`` holding one narinfo):
one read by :class:`~larder.service.front.connection.FrontProtocol` (the short path, handing over to
aiohttp what it does not answer), one by aiohttp's own handler from the first byte.

Invariant: both connections send the same answers (statuses, headers other than ``Date``,
bodies: so the same number of answers, each to the same bytes) and both are closed, or both
kept open, at the end; so no head is read one way by the short path and another by aiohttp.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

from fuzz.common import instrumented, main

with instrumented():
    from larder.core.caches import CacheSettings
    from larder.protocol import nix32
    from larder.protocol.nar import write_nar
    from larder.service import internals, state
    from larder.service.app import build_app
    from larder.service.config import Config
    from larder.service.front.connection import FrontProtocol
    from larder.service.front.limits import ConnectionGuard
    from larder.service.front.short_path import FastPath

from aiohttp import web

from larder.storage.memory import MemoryStorage

#: A store hash whose narinfo the cache holds (the seeds ask for it, and for a missing one).
HELD = "rki6dxbx416rpi6b487bgl8c28bk9mba"
MISSING = "9205nbvhph11jx7p2rbnyddm08cqdacw"
_DATE = re.compile(rb"\r\nDate: [^\r\n]*")
# aiohttp's answer to a head it cannot read ends the connection; its text quotes the bytes of
# the read that failed, which depend on how they arrived: only its status line is compared.
_REFUSAL = re.compile(rb"(HTTP/1\.[01] 400 [^\r\n]*\r\n).*", re.S)
#: Loop turns without new output after which a connection counts as settled.
QUIET_TURNS = 12
MAX_TURNS = 5_000


class Transport(asyncio.Transport):
    """An in-memory transport: keeps what is written, follows ``set_protocol``."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False
        self.protocol: asyncio.BaseProtocol | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.closed:
            self.out += data

    def writelines(self, data: Any) -> None:
        for piece in data:
            self.write(piece)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            protocol = self.protocol
            if protocol is not None:
                asyncio.get_running_loop().call_soon(protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 80)}.get(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_reading(self) -> bool:
        return True

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False


class World:
    """The application, its aiohttp server and its short path, started once."""

    def __init__(self) -> None:
        logging.disable(logging.CRITICAL)  # aiohttp logs every refused head with a traceback
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self._start())

    async def _start(self) -> None:
        app = build_app(Config(), MemoryStorage())
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        assert self.runner.server is not None
        self.server = self.runner.server
        self.fast = FastPath(app, None)
        settings: CacheSettings
        settings, _ = await app[state.CACHES].ensure("main")
        nar = write_nar({"type": "regular", "contents": b"fuzz"})
        digest = nix32.encode(hashlib.sha256(nar).digest())

        async def body() -> AsyncIterator[bytes]:
            yield nar

        nix = app[state.NIX]
        await nix.upload_nar(settings, f"{digest}.nar", body())
        narinfo = (
            f"StorePath: /nix/store/{HELD}-fuzz-1.0\nURL: nar/{digest}.nar\n"
            f"Compression: none\nNarHash: sha256:{digest}\nNarSize: {len(nar)}\nReferences: \n"
        )
        await nix.put_narinfo(settings, HELD, narinfo.encode())

    async def _settle(self, transport: Transport) -> None:
        quiet = 0
        size = -1
        for _ in range(MAX_TURNS):
            await asyncio.sleep(0)
            if transport.closed or len(transport.out) == size:
                quiet += 1
                if quiet >= QUIET_TURNS:
                    return
            else:
                quiet = 0
                size = len(transport.out)

    async def _run(self, front: bool, pieces: list[bytes]) -> tuple[bytes, bool]:
        transport = Transport()
        protocol: asyncio.Protocol
        if front:
            protocol = FrontProtocol(self.server, self.fast, set(), ConnectionGuard(0, 0))
        else:
            protocol = internals.make_handler(self.server, web.RequestHandler)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        for piece in pieces:
            current = transport.protocol
            assert isinstance(current, asyncio.Protocol)
            if not transport.closed:
                current.data_received(piece)
            await self._settle(transport)
        closed = transport.closed
        if not closed:
            transport.close()
        await self._settle(transport)
        return _REFUSAL.sub(rb"\1", _DATE.sub(b"", bytes(transport.out))), closed

    def compare(self, data: bytes, cut: int) -> None:
        for pieces in ([data], [data[:cut], data[cut:]]):
            short = self.loop.run_until_complete(self._run(True, pieces))
            plain = self.loop.run_until_complete(self._run(False, pieces))
            assert short == plain, (data, pieces, short, plain)


WORLD: World | None = None


def one_input(data: bytes) -> None:
    global WORLD
    if len(data) < 2:
        return
    if WORLD is None:
        WORLD = World()
    WORLD.compare(data[1:], data[0] % len(data))


if __name__ == "__main__":
    main(one_input)
