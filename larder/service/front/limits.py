"""Guards for ``larder serve``'s connections against clients that hold them.

aiohttp bounds the size of a request head (8190 bytes a line, 128 headers) and closes idle
keep-alive connections, but nothing bounds how long a head may take to arrive: a client sending
one byte a second holds its connection, and a few thousand such clients hold the server. So:

* ``header_timeout``: a request head (request line and headers) must be complete within this
  many seconds of its first byte, or of the connection opening for a connection's first request.
  Otherwise the server answers ``408`` and closes the connection. Time spent idle between
  keep-alive requests does not count (``keepalive_timeout`` governs it); request bodies have
  their own limit (``body_idle_timeout``). 0 turns the timeout off.
* ``send_timeout`` (``body_idle_timeout``): a connection whose client takes none of the answers
  written to it for this long is dropped with what it has not read. aiohttp waits for a full
  write buffer to drain without a deadline, and a close waits for it to be sent, so a client that
  pipelines requests and reads nothing would keep its connection, and its place under
  ``max_connections``, for good. Whether the client took some is told by
  :func:`~larder.service.progress.unsent`, not by the write buffer emptying.
* ``max_connections``: at most this many connections at once; one more is answered ``503`` with
  ``Retry-After`` and closed at once. 0 means no limit.
* The process's soft limit on open files is raised towards its hard limit so that
  ``max_connections`` connections fit with room to spare (each connection is a descriptor).

Every connection starts with :class:`~larder.service.front.connection.FrontProtocol`, which applies
the same two rules while it reads heads itself and hands the count over with the connection to
:class:`GuardedRequestHandler` (aiohttp's handler, with the rules added). Both kinds of connection
state when their current head began (``head_since``); one :class:`Sweeper` per server checks that
deadline for all of them, the send deadline for aiohttp's (``stalled_since``), and the idle
deadline (:data:`KEEPALIVE_TIMEOUT`) for connections aiohttp does not hold yet, a few times per
``header_timeout`` (at least once a second) rather than by a timer per request.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import hdrs, web

from larder.service import internals
from larder.service.errors import RETRY_AFTER_SECONDS
from larder.service.front.slashes import merging_slashes
from larder.service.progress import unsent

log = logging.getLogger("larder.server")

KEEPALIVE_TIMEOUT = 75.0  # seconds an idle keep-alive connection stays open (run_app's default)
SPARE_FILES = 256  # descriptors kept free beside max_connections (storage files, logs, pipes)
#: The longest time between two sweeps.
MAX_SWEEP_INTERVAL = 1.0

HEAD_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Type: text/plain\r\n"
    b"Cache-Control: no-store\r\nContent-Length: 35\r\n\r\nrequest head not received in time\r\n"
)
BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Type: text/plain\r\n"
    b"Cache-Control: no-store\r\nRetry-After: " + str(RETRY_AFTER_SECONDS).encode() + b"\r\n"
    b"Content-Length: 21\r\n\r\ntoo many connections\n"
)


class Watched(Protocol):
    """A connection the :class:`Sweeper` checks."""

    #: ``time.monotonic()`` when the current request head began, 0 while none is incomplete.
    head_since: float
    #: ``time.monotonic()`` since when its write buffer has been full and the client has taken
    #: nothing, 0 while it is not or the connection keeps its own deadline for it.
    stalled_since: float

    @property
    def transport(self) -> asyncio.BaseTransport | None:
        """The connection's transport, once it has one."""
        ...

    @property
    def idle_since(self) -> float:
        """``time.monotonic()`` since when the connection has been idle; 0 if it is busy or
        its idle time is kept by aiohttp."""
        ...

    def head_timed_out(self) -> None:
        """Answer 408 and close."""

    def close(self) -> None:
        """Close the connection."""

    def expire(self) -> None:
        """Close the connection whose deadline passed, dropping what its client has not read."""

    def took_some(self) -> bool:
        """Whether its client took some of the answers since the last time this was asked (or
        since its write buffer filled)."""
        ...


@dataclass
class ConnectionGuard:
    """The limits, the count of open connections they are checked against, and the
    connections whose deadlines the :class:`Sweeper` checks."""

    header_timeout: float
    max_connections: int
    #: Seconds a connection's client may take none of its answers; 0: no limit.
    send_timeout: float = 0.0
    open: int = field(default=0, init=False)
    refused: int = field(default=0, init=False)
    timed_out: int = field(default=0, init=False)
    watched: set[Watched] = field(default_factory=set, init=False, repr=False)


class Sweeper:
    """Closes the connections of one server whose head or idle deadline has passed."""

    def __init__(self, guard: ConnectionGuard) -> None:
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

    def sweep(self) -> None:
        """Check every watched connection's deadlines now."""
        now = time.monotonic()
        guard = self._guard
        timeout = guard.header_timeout
        send_timeout = guard.send_timeout
        for connection in list(guard.watched):
            stalled = connection.stalled_since
            if send_timeout and stalled and now - stalled >= send_timeout:
                if connection.took_some():  # slowly: its time starts again
                    connection.stalled_since = now
                else:
                    log.debug("the client took nothing for %gs: dropping it", send_timeout)
                    connection.expire()
                    continue
            since = connection.head_since
            if timeout > 0 and since and now - since >= timeout:
                if _server_not_reading(connection):  # the rest of the head waits on the server
                    connection.head_since = now
                    continue
                guard.timed_out += 1
                log.debug("no complete request head in %gs: closing", timeout)
                connection.head_timed_out()
                continue
            idle = connection.idle_since
            if idle and now - idle >= KEEPALIVE_TIMEOUT:
                connection.expire()

    def _sweep(self) -> None:
        self.sweep()
        self._handle = asyncio.get_running_loop().call_later(self.interval, self._sweep)


def _server_not_reading(connection: Watched) -> bool:
    """Whether the server itself stopped reading ``connection`` (its client reads the answers
    to pipelined requests slower than they come): the rest of a head waiting meanwhile is not
    the client's delay."""
    is_reading = getattr(connection.transport, "is_reading", None)  # uvloop's: no subclass
    return callable(is_reading) and not is_reading()


class GuardedRequestHandler(web.RequestHandler):
    """aiohttp's connection handler plus the header timeout and the connection limit.

    A head's time runs from the connection's opening, or from the first byte of a later request
    on an idle connection, until aiohttp's parser has produced the request (or a 400 for a
    malformed one); the server's :class:`Sweeper` checks it. aiohttp offers no hook for either
    moment: :mod:`larder.service.internals` reads them from aiohttp's handler.
    """

    __slots__ = ("_counted", "_guard", "_unsent", "head_since", "stalled_since")

    #: aiohttp closes idle keep-alive connections itself.
    idle_since = 0.0

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._counted = False
        self.head_since = 0.0
        self.stalled_since = 0.0
        self._unsent = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        guard = self._guard
        if guard.max_connections and guard.open >= guard.max_connections:
            guard.refused += 1
            self._reject(BUSY_RESPONSE)
            return
        guard.open += 1
        self._counted = True
        self.head_since = time.monotonic()
        guard.watched.add(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._guard.watched.discard(self)
        if self._counted:
            self._counted = False
            self._guard.open -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self.head_since and internals.waiting_for_request(self):
            self.head_since = time.monotonic()
        parsed = internals.requests_parsed(self)
        super().data_received(data)
        if internals.requests_parsed(self) != parsed:
            self.head_since = 0.0

    def head_timed_out(self) -> None:
        self._guard.watched.discard(self)
        self._reject(HEAD_TIMEOUT_RESPONSE)

    def pause_writing(self) -> None:
        super().pause_writing()
        self.stalled_since = time.monotonic()
        self._unsent = unsent(self.transport)

    def took_some(self) -> bool:
        before, self._unsent = self._unsent, unsent(self.transport)
        return self._unsent < before

    def resume_writing(self) -> None:
        self.stalled_since = 0.0
        super().resume_writing()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request it could not read or route to a handler (400 for a
        malformed head, 500), which no route's headers reach: ``no-store``, or a proxy that
        keeps answers without a lifetime of their own serves one client's mistake to all."""
        response = super().handle_error(request, status, exc, message)
        response.headers.setdefault(hdrs.CACHE_CONTROL, "no-store")
        return response

    def expire(self) -> None:
        """The client took nothing for ``send_timeout``: drop the connection with what it has
        not read (a close would wait for it to be sent)."""
        self._guard.watched.discard(self)
        transport = self.transport
        self.force_close()
        if transport is not None:
            transport.abort()

    def _reject(self, response: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(response)
        self.force_close()


class GuardedServer(web.Server):
    """aiohttp's low-level server, making :class:`GuardedRequestHandler` connections."""

    def __init__(self, *args: Any, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guard = guard

    def __call__(self) -> web.RequestHandler:
        return internals.make_handler(self, GuardedRequestHandler, guard=self.guard)


class GuardedAppRunner(internals.ServerMakingRunner):
    """An :class:`~aiohttp.web.AppRunner` whose server guards its connections."""

    def __init__(self, app: web.Application, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(app, self._guarded, **kwargs)
        self.guard = guard

    def _guarded(self, made: web.Server) -> web.Server:
        return GuardedServer(
            made.request_handler,
            request_factory=merging_slashes(made.request_factory),
            handler_cancellation=made.handler_cancellation,
            guard=self.guard,
            **self.settings,
        )


def raise_open_file_limit(connections: int) -> int:
    """Raise the soft ``RLIMIT_NOFILE`` towards the hard limit; return the soft limit in force.

    Logs a warning when ``connections`` plus :data:`SPARE_FILES` still do not fit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max(connections + SPARE_FILES, soft)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open file limit from %d: %s", soft, exc)
    if connections and connections + SPARE_FILES > soft:
        log.warning(
            "open file limit %d leaves little room for max_connections %d", soft, connections
        )
    return soft
