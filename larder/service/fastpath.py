"""A short path for the request Nix sends most: a narinfo GET, answered before aiohttp.

Every connection of ``larder serve`` starts with :class:`FrontProtocol`, which reads request
heads itself and answers one at once when all of these hold:

* the request line is ``GET /<cache>/<32 nix32 characters>.narinfo HTTP/1.1`` (no query, no
  percent-escapes);
* the head announces no body (no ``Transfer-Encoding``; ``Content-Length`` absent or 0) and has
  no ``Expect`` or ``Upgrade`` header, nor a ``Connection`` header other than ``keep-alive``;
* the cache exists and is public.

The answer comes from the served-narinfo memory (a signed narinfo, or a miss remembered for at
most a second and dropped once any process of the server stored a narinfo) or, when the memory
does not hold it, from the same lookup the application makes (which then remembers it); requests
behind it on the connection wait, so answers keep their order. The answer is what the
application would send (status, ``Content-Type``, ``Content-Length``, ``Date``, ``Server``,
body) and is counted the same way: request, latency, lookup and sent-bytes series, hit
statistics (a miss also remembers its store hash), one access log line.

At the first request that does not qualify, or whose lookup fails, the connection, with every
byte not answered yet, is handed to aiohttp's own protocol for good (``transport.set_protocol``).
The connection guards (:mod:`larder.service.guard`) hold from the start: over
``max_connections`` a connection is answered 503 and closed, and a request head not complete
within ``header_timeout`` of its first byte (or of the connection opening) is answered 408 and
closed; the handover passes the connection's place in the count on to aiohttp's handler.
Everything else (uploads, private caches, HEAD, NARs, errors and whatever follows them on the
connection) is served by the full application, as if the connection had just opened.
"""

from __future__ import annotations

import asyncio
import email.utils
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, cast

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from larder.core.caches import CacheSettings
from larder.errors import FormatError, LarderError
from larder.protocol.names import check_cache_name
from larder.protocol.storepath import check_hash_part
from larder.service import state
from larder.service.accesslog import Entry
from larder.service.guard import BUSY_RESPONSE, HEAD_TIMEOUT_RESPONSE, ConnectionGuard, HeadTimer
from larder.service.observe import HITS, METRICS, count_answer, count_sent_bytes

#: A head longer than this is handed over (aiohttp applies its own limits).
MAX_HEAD = 8192
#: Seconds an idle keep-alive connection stays open (aiohttp's default).
IDLE_TIMEOUT = 75.0

NARINFO_TYPE = b"text/x-nix-narinfo"
NOT_FOUND_TYPE = b"text/plain; charset=utf-8"
NOT_FOUND_BODY = b"404: Not Found"  # what aiohttp answers for web.HTTPNotFound()

_TARGET = re.compile(rb"/([^/?%#]+)/([^/?%#]{32})\.narinfo")
_REFUSED_HEADERS = frozenset({b"transfer-encoding", b"expect", b"upgrade"})
_SERVER = SERVER_SOFTWARE.encode()


class FastPath:
    """Answers qualifying request heads for one application (see the module docstring)."""

    def __init__(self, app: web.Application, log: Callable[[Entry], None] | None) -> None:
        self._app = app
        self._caches = app[state.CACHES]
        self._nix = app[state.NIX]
        self._log = log
        self._second = -1
        self._date = b""

    def _http_date(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._date = email.utils.formatdate(now, usegmt=True).encode()
        return self._date

    def parse(self, head: bytes, peer: str | None) -> NarinfoGet | None:
        """The request ``head`` (without its blank line) if this path may answer it."""
        line, _, fields = head.partition(b"\r\n")
        if not (line.startswith(b"GET ") and line.endswith(b" HTTP/1.1")):
            return None
        target = line[4:-9]
        match = _TARGET.fullmatch(target)
        if match is None:
            return None
        referer = agent = None
        for field in fields.split(b"\r\n") if fields else ():
            name, colon, raw = field.partition(b":")
            if not colon or not name or name[:1] in b" \t":
                return None  # malformed or folded: aiohttp decides
            key = name.lower()
            value = raw.strip()
            if key in _REFUSED_HEADERS:
                return None
            if key == b"content-length" and value != b"0":
                return None
            if key == b"connection" and value.lower() != b"keep-alive":
                return None
            if key == b"user-agent":
                agent = value.decode("latin-1")
            elif key == b"referer":
                referer = value.decode("latin-1")
        try:
            cache = check_cache_name(match.group(1).decode("ascii"))
            store_hash = check_hash_part(match.group(2).decode("ascii"))
        except (FormatError, UnicodeDecodeError):
            return None
        path = target.decode("ascii")
        return NarinfoGet(cache, store_hash, path, peer, referer, agent, time.monotonic())

    def answer_now(self, request: NarinfoGet) -> bytes | Literal[False] | None:
        """The response from memory alone; ``None`` if unknown here (try :meth:`answer_later`);
        ``False`` if the application must answer (a private cache)."""
        settings = self._caches.known(request.cache)
        if settings is None:
            return None
        if settings.private:
            return False
        known, body = self._nix.served_narinfo(settings, request.store_hash)
        return self._respond(request, settings, body) if known else None

    async def answer_later(self, request: NarinfoGet) -> bytes | None:
        """The response after looking the cache and the narinfo up (and remembering them);
        ``None`` if the application must answer (no such cache, private, or an error)."""
        metrics = self._app[METRICS]
        metrics.in_flight.inc()
        try:
            settings = await self._caches.get(request.cache)
            if settings is None or settings.private:
                return None
            body = await self._nix.get_narinfo(settings, request.store_hash)
        except LarderError:
            return None  # the application answers again, with its status for the error
        finally:
            metrics.in_flight.dec()
        return self._respond(request, settings, body)

    def _respond(self, request: NarinfoGet, settings: CacheSettings, body: bytes | None) -> bytes:
        if body is None:
            status, reason, content_type, body = 404, b"Not Found", NOT_FOUND_TYPE, NOT_FOUND_BODY
            self._app[HITS].missed_store_hash(settings.name, request.store_hash)
        else:
            status, reason, content_type = 200, b"OK", NARINFO_TYPE
        response = b"".join(
            (
                b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                % (status, reason, content_type, len(body)),
                b"Date: %s\r\nServer: %s\r\n\r\n" % (self._http_date(), _SERVER),
                body,
            )
        )
        seconds = time.monotonic() - request.start
        self._app[METRICS].add_cache(settings.name)
        count_answer(
            self._app, settings.name, "nix", status, seconds, lookup=("narinfo", status == 200)
        )
        count_sent_bytes(self._app, settings.name, "nix", len(body))
        if self._log is not None:
            self._log(
                Entry(request.peer, "GET", request.path, request.path, (1, 1), status,
                      len(response), seconds, request.referer, request.user_agent)
            )  # fmt: skip
        return response


@dataclass(frozen=True)
class NarinfoGet:
    """A request this path may answer."""

    cache: str
    store_hash: str
    path: str
    peer: str | None
    referer: str | None
    user_agent: str | None
    start: float


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
        self._head_timer = HeadTimer(self._guard, self._head_timed_out)
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._peer: str | None = None
        self._paused = False
        self._last = 0.0
        self._idle: asyncio.TimerHandle | None = None
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
        self._head_timer.start()
        peer = self._transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple | list) and peer else None
        self._open.add(self)
        loop = asyncio.get_running_loop()
        self._last = loop.time()
        self._idle = loop.call_at(self._last + IDLE_TIMEOUT, self._check_idle)

    def data_received(self, data: bytes) -> None:
        if not self._buffer and self._lookup is None:
            self._head_timer.start()  # the first byte of the next request's head
        self._buffer += data
        self._serve()

    def _head_timed_out(self) -> None:
        if self._transport is not None and self in self._open:
            self._transport.write(HEAD_TIMEOUT_RESPONSE)
            self.close()

    def _serve(self) -> None:
        while not self._paused and self._lookup is None and self._transport is not None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD:
                    self._hand_over()
                elif self._buffer:
                    self._head_timer.start()  # part of a pipelined head: it has its time too
                return
            self._head_timer.stop()
            request = self._fast.parse(bytes(self._buffer[:end]), self._peer)
            if request is None:
                self._hand_over()
                return
            response = self._fast.answer_now(request)
            if response is False:
                self._hand_over()
                return
            if response is None:  # look it up; later requests wait, so answers keep their order
                self._lookup = asyncio.get_running_loop().create_task(self._later(request, end))
                return
            self._send(response, end)

    def _send(self, response: bytes, end: int) -> None:
        assert self._transport is not None
        del self._buffer[: end + 4]
        self._last = asyncio.get_running_loop().time()
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
        self._serve()
        if self._eof and self._lookup is None and self in self._open:
            self.close()  # the client is done sending and everything it sent is answered

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
        self._head_timer.stop()
        if self._lookup is not None:
            self._lookup.cancel()
            self._lookup = None
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _check_idle(self) -> None:
        self._idle = None
        if self._transport is None or self not in self._open:
            return
        loop = asyncio.get_running_loop()
        if loop.time() - self._last >= IDLE_TIMEOUT:
            self.close()
        else:
            self._idle = loop.call_at(self._last + IDLE_TIMEOUT, self._check_idle)

    def close(self) -> None:
        """Close the connection (idle, or the server is stopping)."""
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
