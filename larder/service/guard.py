"""Guards for ``larder serve``'s connections against clients that hold them.

aiohttp bounds the size of a request head (8190 bytes a line, 128 headers) and closes idle
keep-alive connections, but nothing bounds how long a head may take to arrive: a client sending
one byte a second holds its connection, and a few thousand such clients hold the server. So:

* ``header_timeout``: a request head (request line and headers) must be complete within this
  many seconds of its first byte, or of the connection opening for a connection's first request.
  Otherwise the server answers ``408`` and closes the connection. Time spent idle between
  keep-alive requests does not count (``keepalive_timeout`` governs it); request bodies have
  their own limit (``body_idle_timeout``). 0 turns the timeout off.
* ``max_connections``: at most this many connections at once; one more is answered ``503`` with
  ``Retry-After`` and closed at once. 0 means no limit.
* The process's soft limit on open files is raised towards its hard limit so that
  ``max_connections`` connections fit with room to spare (each connection is a descriptor).

Every connection starts with :class:`~larder.service.fastpath.FrontProtocol`, which applies the
same two rules while it reads heads itself and hands the count over with the connection to
:class:`GuardedRequestHandler` (aiohttp's handler, with the rules added).
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

log = logging.getLogger("larder.server")

KEEPALIVE_TIMEOUT = 75.0  # seconds an idle keep-alive connection stays open (run_app's default)
SPARE_FILES = 256  # descriptors kept free beside max_connections (storage files, logs, pipes)
RETRY_AFTER = 1

HEAD_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 35\r\n\r\nrequest head not received in time\r\n"
)
BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Type: text/plain\r\n"
    b"Retry-After: " + str(RETRY_AFTER).encode() + b"\r\nContent-Length: 21\r\n\r\n"
    b"too many connections\n"
)


@dataclass
class ConnectionGuard:
    """The limits, and the count of open connections they are checked against."""

    header_timeout: float
    max_connections: int
    open: int = field(default=0, init=False)
    refused: int = field(default=0, init=False)
    timed_out: int = field(default=0, init=False)


class HeadTimer:
    """One connection's request-head deadline: :meth:`start` when a head begins (a no-op while
    running), :meth:`stop` when it is complete; ``expired`` is called if it runs out."""

    __slots__ = ("_expired", "_guard", "_handle")

    def __init__(self, guard: ConnectionGuard, expired: Callable[[], None]) -> None:
        self._guard = guard
        self._expired = expired
        self._handle: asyncio.TimerHandle | None = None

    @property
    def running(self) -> bool:
        return self._handle is not None

    def start(self) -> None:
        timeout = self._guard.header_timeout
        if timeout > 0 and self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(timeout, self._fire)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        self._guard.timed_out += 1
        log.debug("no complete request head in %gs: closing", self._guard.header_timeout)
        self._expired()


class GuardedRequestHandler(web.RequestHandler):
    """aiohttp's connection handler plus the header timeout and the connection limit.

    The timer runs while a head is being read: it starts when the connection opens, and again
    when the first byte of a later request arrives on an idle connection; it stops when aiohttp's
    parser has produced the request (or a 400 for a malformed one). aiohttp offers no hook for
    this, so it reads two of the base class's attributes: ``_request_count`` (requests parsed)
    and ``_waiter`` (pending while the connection waits for a request);
    ``tests/e2e/test_connections.py`` fails if either changes meaning.
    """

    __slots__ = ("_counted", "_guard", "_head_timer")

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._head_timer = HeadTimer(guard, lambda: self._reject(HEAD_TIMEOUT_RESPONSE))
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        guard = self._guard
        if guard.max_connections and guard.open >= guard.max_connections:
            guard.refused += 1
            self._reject(BUSY_RESPONSE)
            return
        guard.open += 1
        self._counted = True
        self._head_timer.start()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._head_timer.stop()
        if self._counted:
            self._counted = False
            self._guard.open -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._head_timer.running and self._waiting_for_request():
            self._head_timer.start()
        parsed = self._request_count
        super().data_received(data)
        if self._request_count != parsed:
            self._head_timer.stop()

    def _waiting_for_request(self) -> bool:
        """Idle between requests: new bytes are the start of the next request's head."""
        return self._waiter is not None and not self._waiter.done()

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
        return GuardedRequestHandler(self, loop=self._loop, guard=self.guard, **self._kwargs)


class GuardedAppRunner(web.AppRunner):
    """An :class:`~aiohttp.web.AppRunner` whose server guards its connections."""

    def __init__(self, app: web.Application, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.guard = guard

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()  # starts the app; its Server is replaced
        return GuardedServer(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            guard=self.guard,
            **self._kwargs,
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
