"""Every connection's first protocol: what Nix asks most answered here, the rest by aiohttp.

:class:`FrontProtocol` feeds every read to the connection's
:class:`~larder.service.front.heads.HeadReader` (llhttp, with aiohttp's own checks) and gives each
whole head it read to :class:`~larder.service.front.short_path.FastPath`. A NAR's head goes through
the transport, its body by ``sendfile(2)`` straight to the socket
(:func:`~larder.service.routes.bodies.send_file`); a transfer that fails closes the connection. At
the first read aiohttp would refuse, or the first request the fast path does not answer or whose
lookup fails, the connection, with every byte not answered yet, is handed to aiohttp's own protocol
for good (``transport.set_protocol``): malformed heads, uploads, private caches, NAR misses and
HEADs, ranges, errors and whatever follows them on the connection are read and answered by aiohttp,
as if the connection had just opened.

Memory is bounded in every state. Reading is paused while an answer is in flight (a lookup, a
NAR being sent: requests behind it wait, so answers keep their order), while the transport's
write buffer is full (the client does not read), and while :data:`MAX_BUFFER` unanswered bytes
are held; so the input buffer never holds more than that plus one read, and the reader keeps at
most :data:`~larder.service.front.heads.MAX_KEPT` of its heads read. Bytes without a whole head past
:data:`~larder.service.front.heads.MAX_HEAD` go to aiohttp, which applies its own limits.

The connection guards (:mod:`larder.service.front.limits`) hold from the start: over
``max_connections`` a connection is answered 503 and closed, and a request head not complete
within ``header_timeout`` of its first byte (or of the connection opening) is answered 408 and
closed (by the server's :class:`~larder.service.front.limits.Sweeper`); the handover passes the
connection's place in the count on to aiohttp's handler. An idle keep-alive connection is closed
after :data:`~larder.service.front.limits.KEEPALIVE_TIMEOUT` seconds, as aiohttp closes its own (one
looking up or sending is not idle; a NAR transfer has its own deadline, ``body_idle_timeout``
without progress).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any, cast

from aiohttp import web

from larder.service.front.heads import AGAIN, END, MAX_HEAD, Head, HeadReader
from larder.service.front.limits import BUSY_RESPONSE, HEAD_TIMEOUT_RESPONSE, ConnectionGuard
from larder.service.front.short_path import FastPath, NarGet, NarinfoGet, OpenNar
from larder.service.progress import while_taking
from larder.service.routes.bodies import SendFailed, send_file

log = logging.getLogger("larder.server")

#: Unanswered bytes held before reading pauses.
MAX_BUFFER = 64 * 1024
_CRLF = b"\r\n"
_HEAD = tuple.__new__  # a Head from its three fields, without NamedTuple's own __new__


class FrontProtocol(asyncio.Protocol):
    """A connection's first protocol: answers what :class:`FastPath` can, then hands over."""

    #: A client taking nothing meets the idle deadline here, or a NAR transfer's own (its
    #: head waiting behind earlier answers included).
    stalled_since = 0.0

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
        self._reader = HeadReader()
        #: The last whole head's bytes after its target, and its fields (:meth:`_again`).
        self._rest = b""
        self._rest_fields: dict[bytes, bytes] = {}
        self._transport: asyncio.Transport | None = None
        self._peer: str | None = None
        #: The transport's write buffer is full (``pause_writing``).
        self._paused = False
        #: Whether the transport is reading (this protocol pauses and resumes it).
        self._reading = True
        #: Set while waiting for the write buffer to empty (a NAR's head before its body).
        self._drained: asyncio.Future[None] | None = None
        #: ``time.monotonic()`` of the last answer (or of the opening): the idle deadline counts
        #: from it.
        self.last = 0.0
        #: ``time.monotonic()`` when a request head began arriving, 0 while none is incomplete.
        self.head_since = 0.0
        self._lookup: asyncio.Task[None] | None = None
        self._eof = False
        #: The server is stopping: close once the answer in progress is sent.
        self._stopping = False

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
        guard.watched.add(self)
        self.last = self.head_since = time.monotonic()

    def data_received(self, data: bytes) -> None:
        if self._buffer or self._lookup is not None or self._paused:
            self._more(data)
            return
        # The common case: exactly one whole head, often answered from kept bytes.
        head = self._again(data)
        if head is None:
            reader = self._reader
            if not reader.feed(data):
                self._buffer += data
                self._hand_over()  # aiohttp refuses these bytes too
                return
            if len(reader.heads) != 1 or data.find(END) != len(data) - 4 or data[0] in _CRLF:
                self._held(data)
                return
            head = reader.heads.popleft()
            if head is None:
                self._buffer += data
                self._hand_over()
                return
            self._remember(data, head)
        response = self._fast.quick(head, self._fast.client(head, self._peer))
        if response is not None and self._transport is not None:
            self.head_since = 0.0
            self.last = time.monotonic()
            self._transport.write(response)
            return
        self._buffer += data
        if self._dispatch(head, len(data)):
            self._serve()

    def _more(self, data: bytes) -> None:
        """Bytes arriving behind others not answered yet."""
        if not self._reader.feed(data):
            self._buffer += data
            self._hand_over()
            return
        self._held(data)

    def _held(self, data: bytes) -> None:
        if not self.head_since:
            self.head_since = time.monotonic()
        self._buffer += data
        self._serve()

    def _again(self, data: bytes) -> Head | None:
        """The head ``data`` without reading it again, when it is ``GET``, a target answered
        before, and the rest of the last head llhttp read on this connection as a whole request
        (so llhttp would read it the same way; its parser stays between requests)."""
        rest = self._rest
        if rest and data.endswith(rest) and data.startswith(b"GET "):
            target = data[4 : len(data) - len(rest)]
            if self._fast.kept(target):
                return _HEAD(Head, (b"GET", target, self._rest_fields))
        return None

    def _remember(self, data: bytes, head: Head) -> None:
        """Keep the rest of ``data`` after a ``GET`` head's target for :meth:`_again`."""
        target = head.target
        size = 4 + len(target)
        if (
            head.method == b"GET"
            and len(data) <= MAX_HEAD
            and data[4:size] == target
            and data.startswith(b"GET ")
            and data[size : size + 1] == b" "
        ):
            self._rest = data[size:]
            self._rest_fields = head.fields

    def head_timed_out(self) -> None:
        """The head did not arrive within ``header_timeout``: answer 408 and close."""
        if self._transport is not None and self in self._open:
            self._transport.write(HEAD_TIMEOUT_RESPONSE)
            self.expire()

    def expire(self) -> None:
        """A deadline passed: close, and drop the answers still waiting to be sent (a close
        waits for them, and a client that reads nothing would keep the connection, and its
        place under ``max_connections``, for good)."""
        self._forget()
        if self._transport is not None:
            if self._transport.get_write_buffer_size():
                self._transport.abort()
            else:
                self._transport.close()

    def _serve(self) -> None:
        """Answer the whole heads held, in order, until one must wait or go to aiohttp."""
        heads = self._reader.heads
        while not self._paused and self._lookup is None and self._transport is not None:
            end = self._buffer.find(END)
            if end < 0:
                if len(self._buffer) > MAX_HEAD or heads:  # heads: one ended otherwise
                    self._hand_over()
                    return
                if self._buffer and not self.head_since:
                    self.head_since = time.monotonic()  # part of a pipelined head
                break
            # The head must be the next request llhttp completed: not past the short path's
            # size, not after empty lines (llhttp skips them), and without a body.
            if end + 4 > MAX_HEAD or self._buffer[0] in _CRLF or not heads:
                self._hand_over()
                return
            head = heads.popleft()
            if head is AGAIN:
                head = HeadReader.again(bytes(self._buffer[: end + 4]))
            if head is None or not self._dispatch(head, end + 4):
                if head is None:
                    self._hand_over()
                return
        self._set_reading()

    def _dispatch(self, head: Head, size: int) -> bool:
        """Answer ``head`` (the first ``size`` bytes held); whether the next may be served."""
        self.head_since = 0.0
        fast = self._fast
        peer = fast.client(head, self._peer)
        response = fast.quick(head, peer)
        if response is not None:
            self._send(response, size)
            return True
        request = fast.parse(head, peer)
        if request is None:
            info = fast.cache_info(head, peer)
            if info is not None:
                self._send(info, size)
                return True
            nar = fast.parse_nar(head, peer)
            if nar is None:
                self._hand_over()
            else:  # sent from a task; later requests wait, so answers keep their order
                self._start(self._send_nar(nar, size))
            return False
        answer = fast.answer_now(request)
        if answer is False:
            self._hand_over()
            return False
        if answer is None:  # look it up; later requests wait, so answers keep their order
            self._start(self._later(request, size))
            return False
        self._send(answer, size)
        return True

    def _start(self, work: Coroutine[Any, Any, None]) -> None:
        self._lookup = asyncio.get_running_loop().create_task(work)
        self._set_reading()

    def _set_reading(self) -> None:
        """Read only while nothing is in flight, the client takes what is written, and fewer
        than :data:`MAX_BUFFER` bytes wait."""
        wanted = self._lookup is None and not self._paused and len(self._buffer) < MAX_BUFFER
        if wanted != self._reading and self._transport is not None:
            self._reading = wanted
            if wanted:
                self._transport.resume_reading()
            else:
                self._transport.pause_reading()

    def _send(self, response: bytes, size: int) -> None:
        assert self._transport is not None
        del self._buffer[:size]
        self.last = time.monotonic()
        self._transport.write(response)

    async def _later(self, request: NarinfoGet, size: int) -> None:
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
        self._send(response, size)
        self._go_on()

    def _go_on(self) -> None:
        """After an answer a task made: serve what came behind it, or close once the client is
        done sending and everything it sent is answered."""
        if self._stopping:
            self.close()
            return
        self._serve()
        if self._eof and self._lookup is None and self in self._open:
            self.close()

    @property
    def idle_since(self) -> float:
        """``last``, or 0 while looking an answer up or sending a NAR (not idle then)."""
        return self.last if self._lookup is None else 0.0

    async def _send_nar(self, request: NarGet, size: int) -> None:
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
        del self._buffer[:size]
        transport = self._transport
        sent = 0
        try:
            sent = await self._write_nar(transport, request, nar)
        except SendFailed as exc:
            sent = exc.sent
        except (OSError, RuntimeError):
            pass
        finally:
            await nar.close()
        self._fast.nar_sent(request, nar, sent)
        self._lookup = None
        if sent < nar.size:  # the client sees a body shorter than its Content-Length
            self.expire()  # a close would wait for what is written to leave
            return
        self.last = time.monotonic()
        if self._transport is None or self not in self._open:
            return
        self._go_on()

    async def _write_nar(self, transport: asyncio.Transport, request: NarGet, nar: OpenNar) -> int:
        """Send the head, then the blob; the body bytes sent."""
        transport.write(nar.head)
        self._fast.nar_started(request, nar)
        await self._until_written(transport)  # the head must leave before the body
        sock = transport.get_extra_info("socket")
        if sock is None:
            raise ConnectionResetError("connection lost")
        loop = asyncio.get_running_loop()
        return await send_file(loop, sock.fileno(), nar.fd, 0, nar.size, self._fast.send_idle)

    async def _until_written(self, transport: asyncio.Transport) -> None:
        """Wait until the transport's write buffer is empty: with both limits at 0 the
        transport pauses this protocol at once and resumes it when the buffer is empty.
        :class:`SendFailed` once the client takes nothing for ``body_idle_timeout`` (a client
        that pipelined requests and read none of the answers held its connection for good)."""
        if not transport.get_write_buffer_size():
            return
        self._drained = asyncio.get_running_loop().create_future()
        transport.set_write_buffer_limits(high=0, low=0)
        idle = self._fast.send_idle
        try:
            await while_taking(self._drained, transport, idle)
        except TimeoutError:
            raise SendFailed(f"the client took nothing for {idle:g} s", 0) from None
        finally:
            self._drained = None
            if not transport.is_closing():
                transport.set_write_buffer_limits()

    def _hand_over(self) -> None:
        transport = self._transport
        assert transport is not None
        if transport.is_closing():  # an answer's write found the peer gone: aiohttp would get
            self.close()  # connection_lost before its handler started, and log a traceback
            return
        self._forget()
        if self._counted:  # the handler counts the connection from here on
            self._counted = False
            self._guard.open -= 1
        handler = self._server()
        transport.set_protocol(handler)
        if not self._reading:  # aiohttp pauses and resumes reading itself from here on
            self._reading = True
            transport.resume_reading()
        handler.connection_made(transport)
        if self._paused:
            handler.pause_writing()
        data, self._buffer = bytes(self._buffer), bytearray()
        if data:
            handler.data_received(data)

    def _forget(self) -> None:
        self._open.discard(self)
        self._guard.watched.discard(self)
        self.head_since = 0.0
        if self._lookup is not None:
            self._lookup.cancel()
            self._lookup = None

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._transport

    def stop(self) -> bool:
        """The server is stopping: close now when idle, else once the answer in progress (a
        lookup, a NAR being sent) is done; whether it is closed now."""
        if self._lookup is None:
            self.close()
            return True
        self._stopping = True
        return False

    def took_some(self) -> bool:
        """Not asked: this protocol keeps no ``stalled_since``."""
        return False

    def close(self) -> None:
        """Close the connection (idle, timed out, or the server is stopping)."""
        self._forget()
        if self._transport is not None:
            self._transport.close()

    def pause_writing(self) -> None:
        self._paused = True
        self._set_reading()

    def resume_writing(self) -> None:
        self._paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        if self._lookup is None:
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
