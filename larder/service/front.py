"""Every connection's first protocol: what Nix asks most answered here, the rest by aiohttp.

:class:`FrontProtocol` reads request heads itself and gives each complete one to
:class:`~larder.service.fastpath.FastPath`; requests behind a head that needs a storage lookup,
or behind a NAR being sent, wait for it (reading pauses while a NAR goes out), so answers keep
their order. A NAR's head goes through the transport, its body by ``sendfile(2)`` straight to the
socket (:func:`~larder.service.transfer.send_file`); a transfer that fails closes the connection.
At the first request the fast path does not take, or whose lookup fails, the connection, with
every byte not answered yet, is handed to aiohttp's own protocol for good
(``transport.set_protocol``): uploads, private caches, NAR misses and HEADs, ranges, errors and
whatever follows them on the connection are served by the full application, as if the
connection had just opened.

The connection guards (:mod:`larder.service.guard`) hold from the start: over
``max_connections`` a connection is answered 503 and closed, and a request head not complete
within ``header_timeout`` of its first byte (or of the connection opening) is answered 408 and
closed; the handover passes the connection's place in the count on to aiohttp's handler. An idle
keep-alive connection is closed after :data:`IDLE_TIMEOUT` seconds (one looking up or sending is
not idle; a NAR transfer has its own deadline, ``body_idle_timeout`` without progress). Both
deadlines are checked by one :class:`Sweeper` per server, a few times per ``header_timeout`` (at
least once a second), rather than by a timer per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import cast

from aiohttp import web

from larder.service.fastpath import FastPath, NarGet, NarinfoGet, OpenNar
from larder.service.guard import BUSY_RESPONSE, HEAD_TIMEOUT_RESPONSE, ConnectionGuard
from larder.service.transfer import send_file

log = logging.getLogger("larder.server")

#: A head longer than this is handed over (aiohttp applies its own limits).
MAX_HEAD = 8192
#: Seconds an idle keep-alive connection stays open (aiohttp's default).
IDLE_TIMEOUT = 75.0
#: The longest time between two sweeps.
MAX_SWEEP_INTERVAL = 1.0


class FrontProtocol(asyncio.Protocol):
    """A connection's first protocol: answers what :class:`FastPath` can, then hands over."""

    def __init__(
        self,
        server: web.Server,
        fast: FastPath,
        open_set: set[FrontProtocol],
        guard: ConnectionGuard | None = None,
    ) -> None:
        self._server = server
        self._fast = fast
        self._open = open_set
        self._guard = guard or ConnectionGuard(0, 0)
        self._counted = False
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._peer: str | None = None
        self._paused = False
        #: ``time.monotonic()`` of the last answer (or of the opening): the idle deadline counts
        #: from it.
        self.last = 0.0
        #: ``time.monotonic()`` when a request head began arriving, 0 while none is incomplete.
        self.head_since = 0.0
        self._lookup: asyncio.Task[None] | None = None
        self._eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        guard = self._guard
        if guard.max_connections and guard.open >= guard.max_connections:
            guard.refused += 1
            self._transport.write(BUSY_RESPONSE)
            self._transport.close()
            return
        guard.open += 1
        self._counted = True
        peer = self._transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple | list) and peer else None
        self._open.add(self)
        self.last = self.head_since = time.monotonic()

    def data_received(self, data: bytes) -> None:
        if not self._buffer and self._lookup is None and not self._paused:
            # The common case: exactly one whole head, answered from kept bytes.
            if data.endswith(b"\r\n\r\n") and data.find(b"\r\n\r\n") == len(data) - 4:
                response = self._fast.quick(data[:-4], self._peer)
                if response is not None and self._transport is not None:
                    self.head_since = 0.0
                    self.last = time.monotonic()
                    self._transport.write(response)
                    return
            if not self.head_since:
                self.head_since = time.monotonic()
        self._buffer += data
        self._serve()

    def head_timed_out(self) -> None:
        """The head did not arrive within ``header_timeout``: answer 408 and close."""
        self._guard.timed_out += 1
        log.debug("no complete request head in %gs: closing", self._guard.header_timeout)
        if self._transport is not None and self in self._open:
            self._transport.write(HEAD_TIMEOUT_RESPONSE)
            self.close()

    def _serve(self) -> None:
        while not self._paused and self._lookup is None and self._transport is not None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD:
                    self._hand_over()
                elif self._buffer and not self.head_since:
                    self.head_since = (
                        time.monotonic()
                    )  # part of a pipelined head: it has its time too
                return
            self.head_since = 0.0
            head = bytes(self._buffer[:end])
            response = self._fast.quick(head, self._peer)
            if response is not None:
                self._send(response, end)
                continue
            request = self._fast.parse(head, self._peer)
            if request is None:
                info = self._fast.cache_info(head, self._peer)
                if info is not None:
                    self._send(info, end)
                    continue
                nar = self._fast.parse_nar(head, self._peer)
                if nar is None:
                    self._hand_over()
                else:  # sent from a task; later requests wait, so answers keep their order
                    self._lookup = asyncio.get_running_loop().create_task(self._send_nar(nar, end))
                return
            answer = self._fast.answer_now(request)
            if answer is False:
                self._hand_over()
                return
            if answer is None:  # look it up; later requests wait, so answers keep their order
                self._lookup = asyncio.get_running_loop().create_task(self._later(request, end))
                return
            self._send(answer, end)

    def _send(self, response: bytes, end: int) -> None:
        assert self._transport is not None
        del self._buffer[: end + 4]
        self.last = time.monotonic()
        self._transport.write(response)

    async def _later(self, request: NarinfoGet, end: int) -> None:
        try:
            response = await self._fast.answer_later(request)
        except Exception:  # not expected: the application answers it, and reports what broke
            response = None
        finally:
            self._lookup = None
        if self._transport is None or self not in self._open:
            return  # closed meanwhile
        if response is None:
            self._hand_over()
            return
        self._send(response, end)
        self._go_on()

    def _go_on(self) -> None:
        """After an answer a task made: serve what came behind it, or close once the client is
        done sending and everything it sent is answered."""
        self._serve()
        if self._eof and self._lookup is None and self in self._open:
            self.close()

    @property
    def busy(self) -> bool:
        """Looking an answer up or sending a NAR: not idle, whatever the time since ``last``."""
        return self._lookup is not None

    async def _send_nar(self, request: NarGet, end: int) -> None:
        try:
            nar = await self._fast.open_nar(request)
        except Exception:  # not expected: the application answers it, and reports what broke
            nar = None
        if self._transport is None or self not in self._open:
            self._lookup = None
            if nar is not None:
                await nar.close()
            return  # closed meanwhile
        if nar is None:
            self._lookup = None
            self._hand_over()
            return
        del self._buffer[: end + 4]
        transport = self._transport
        transport.pause_reading()
        complete = False
        try:
            await self._write_nar(transport, request, nar)
            complete = True
        except (OSError, RuntimeError):
            pass
        finally:
            await nar.close()
        self._fast.nar_sent(request, nar, nar.size if complete else 0)
        self._lookup = None
        if not complete:
            self.close()  # the client sees a body shorter than its Content-Length
            return
        self.last = time.monotonic()
        if self._transport is None or self not in self._open:
            return
        if not self._paused:
            transport.resume_reading()
        self._go_on()

    async def _write_nar(self, transport: asyncio.Transport, request: NarGet, nar: OpenNar) -> None:
        """Send the head, then the blob."""
        transport.write(nar.head)
        self._fast.nar_started(request, nar)
        while transport.get_write_buffer_size():  # the head must leave before the body
            await asyncio.sleep(0.001)
            if transport.is_closing():
                raise ConnectionResetError("connection lost")
        sock = transport.get_extra_info("socket")
        if sock is None:
            raise ConnectionResetError("connection lost")
        loop = asyncio.get_running_loop()
        await send_file(loop, sock.fileno(), nar.fd, 0, nar.size, self._fast.send_idle)

    def _hand_over(self) -> None:
        transport = self._transport
        assert transport is not None
        self._forget()
        if self._counted:  # the handler counts the connection from here on
            self._counted = False
            self._guard.open -= 1
        handler = self._server()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        data, self._buffer = bytes(self._buffer), bytearray()
        if data:
            handler.data_received(data)

    def _forget(self) -> None:
        self._open.discard(self)
        self.head_since = 0.0
        if self._lookup is not None:
            self._lookup.cancel()
            self._lookup = None

    def close(self) -> None:
        """Close the connection (idle, timed out, or the server is stopping)."""
        self._forget()
        if self._transport is not None:
            self._transport.close()

    def pause_writing(self) -> None:
        self._paused = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        if self._transport is not None:
            self._transport.resume_reading()
            if self._buffer:
                self._serve()

    def eof_received(self) -> bool | None:
        """The client is done sending: close once written, or once the lookup is answered."""
        self._eof = True
        return True if self._lookup is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        if self._counted:
            self._counted = False
            self._guard.open -= 1
        self._transport = None


class Sweeper:
    """Closes the front connections of one server whose head or idle deadline has passed."""

    def __init__(self, connections: set[FrontProtocol], guard: ConnectionGuard) -> None:
        self._connections = connections
        self._guard = guard
        timeout = guard.header_timeout
        self.interval = min(MAX_SWEEP_INTERVAL, timeout / 4) if timeout > 0 else MAX_SWEEP_INTERVAL
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._handle = asyncio.get_running_loop().call_later(self.interval, self._sweep)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _sweep(self) -> None:
        now = time.monotonic()
        timeout = self._guard.header_timeout
        for connection in list(self._connections):
            if timeout > 0 and connection.head_since and now - connection.head_since >= timeout:
                connection.head_timed_out()
            elif now - connection.last >= IDLE_TIMEOUT and not connection.busy:
                connection.close()
        self._handle = asyncio.get_running_loop().call_later(self.interval, self._sweep)
