"""Every use of aiohttp's and prometheus-client's private parts, in one place.

Neither library offers a hook for these; each use is small, and ``pyproject.toml`` caps both
libraries at the newest minor release checked (``tests/service/test_internals.py`` fails when
one of these changes name or meaning, so raising a cap means running it):

* aiohttp ``RequestHandler._request_count`` (requests parsed on the connection) and
  ``RequestHandler._waiter`` (pending while the connection waits for its next request): when a
  request head begins and ends, for the header timeout (:mod:`larder.service.front.limits`);
* aiohttp ``Server._loop`` and ``Server._kwargs``: making a handler of larder's class with the
  settings the application gave, and ``AppRunner._make_server``: giving the runner that server;
* aiohttp ``FileResponse._sendfile``: sending a file body by ``sendfile(2)`` from the event loop
  on uvloop, which has no ``loop.sendfile`` (:class:`ZeroCopyFileResponse`);
* prometheus-client histogram children's ``_sum`` and ``_buckets``: adding many observations at
  once (:func:`observe_many`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import IO, Any

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.web_request import BaseRequest

# -- aiohttp's connection handler and server ---------------------------------------------------


def requests_parsed(handler: web.RequestHandler) -> int:
    """How many request heads aiohttp's parser has produced on ``handler``'s connection
    (including one answered 400 for being malformed)."""
    return handler._request_count


def waiting_for_request(handler: web.RequestHandler) -> bool:
    """Whether ``handler``'s connection is idle between requests: new bytes begin a head."""
    waiter = handler._waiter
    return waiter is not None and not waiter.done()


def make_handler(
    server: web.Server, factory: Callable[..., web.RequestHandler], **extra: Any
) -> web.RequestHandler:
    """``factory(server, loop=..., **settings, **extra)``: a connection handler made as
    ``server()`` makes aiohttp's own, with the settings the application gave."""
    return factory(server, loop=server._loop, **server._kwargs, **extra)


class ServerMakingRunner(web.AppRunner):
    """An :class:`~aiohttp.web.AppRunner` whose server is ``remake(the server aiohttp made)``
    (the application has started by then)."""

    def __init__(
        self, app: web.Application, remake: Callable[[web.Server], web.Server], **kwargs: Any
    ) -> None:
        super().__init__(app, **kwargs)
        self._remake = remake

    async def _make_server(self) -> web.Server:
        return self._remake(await super()._make_server())

    @property
    def settings(self) -> dict[str, Any]:
        """The keyword arguments this runner was given for its server."""
        return dict(self._kwargs)


# -- aiohttp's file response --------------------------------------------------------------------


#: Sends ``count`` bytes of file descriptor ``file_fd`` from ``offset`` to socket ``sock_fd``;
#: returns the count (:func:`larder.service.routes.bodies.send_file`).
SendFile = Callable[[asyncio.AbstractEventLoop, int, int, int, int, float], Awaitable[int]]


class ZeroCopyFileResponse(web.FileResponse):
    """``web.FileResponse`` that stays zero-copy on every event loop, gives up on a client that
    takes nothing, and counts the body bytes sent in :attr:`body_length`.

    uvloop has no ``loop.sendfile``, and aiohttp then reads the file in 256 KiB pieces through a
    thread and writes them; asyncio's waits for a client that takes nothing for good. Here the
    body goes out by ``send`` (``sendfile(2)`` from the event loop) once the head has left,
    giving up once the client takes nothing for ``idle`` seconds, as uploads do. aiohttp's
    ``body_length`` counts only what went through its writer (the head, when the body leaves by
    ``sendfile``); the body's bytes sent by ``sendfile`` are added to it, so the access log
    states what was sent, and given to :attr:`on_body_sent` once the transfer ends (completed or
    not): the bytes the writer never saw, which its ``on_body_write`` does not report.
    """

    #: Called once with the body bytes ``sendfile`` sent, when the transfer ends.
    on_body_sent: Callable[[int], None] | None = None

    def __init__(
        self,
        path: str | os.PathLike[str],
        idle: float,
        send: SendFile,
        byte_range: str | None,
        **kwargs: Any,
    ) -> None:
        super().__init__(path, **kwargs)
        self._idle = idle
        self._send = send
        self._range = byte_range
        self.body_sent = 0
        self._through_writer = False

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        """Prepare with ``Range`` as the caller decided it (``None``: no range), whatever the
        request said: aiohttp answers 416 to a field it cannot parse or to several ranges, and
        takes ``bytes=-0`` for the whole file, where RFC 9110 ignores the first two and refuses
        the last."""
        if request.headers.get(hdrs.RANGE) != self._range:
            headers = request.headers.copy()
            headers.popall(hdrs.RANGE, None)
            if self._range is not None:
                headers[hdrs.RANGE] = self._range
            request = request.clone(headers=headers)
        return await super().prepare(request)

    @property
    def body_length(self) -> int:
        return super().body_length + self.body_sent

    async def _sendfile_fallback(
        self, writer: AbstractStreamWriter, fobj: IO[Any], offset: int, count: int
    ) -> AbstractStreamWriter:
        self._through_writer = True  # its writer counts these bytes
        return await super()._sendfile_fallback(writer, fobj, offset, count)

    async def _sendfile(
        self, request: BaseRequest, fobj: IO[Any], offset: int, count: int
    ) -> AbstractStreamWriter:
        try:
            return await self._send_body(request, fobj, offset, count)
        finally:
            if self.body_sent and (notify := self.on_body_sent) is not None:
                notify(self.body_sent)

    async def _send_body(
        self, request: BaseRequest, fobj: IO[Any], offset: int, count: int
    ) -> AbstractStreamWriter:
        loop = asyncio.get_running_loop()
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None or self.compression:
            writer = await super()._sendfile(request, fobj, offset, count)
            if not self._through_writer:
                self.body_sent = count  # loop.sendfile raises unless all of it went
            return writer
        prepared = await web.StreamResponse.prepare(self, request)
        assert prepared is not None and transport is not None
        writer = prepared
        await writer.drain()
        if transport.get_write_buffer_size():  # the head must leave before the body
            transport.set_write_buffer_limits(high=0, low=0)  # paused until it has left
            try:
                await writer.drain()
            finally:
                if not transport.is_closing():
                    transport.set_write_buffer_limits()
        try:
            self.body_sent = await self._send(
                loop, sock.fileno(), fobj.fileno(), offset, count, self._idle
            )
        except ConnectionError as exc:
            self.body_sent = getattr(exc, "sent", 0)
            raise
        await web.StreamResponse.write_eof(self)
        return writer


# -- prometheus-client's histograms -------------------------------------------------------------


def observe_many(child: Any, buckets: list[int], total: float) -> None:
    """Add to a histogram child, at once, observations whose per-bucket counts are ``buckets``
    (non-cumulative, one per upper bound and then +Inf) and whose values add up to ``total``:
    the same series as observing each one."""
    child._sum.inc(total)
    for value, count in zip(child._buckets, buckets, strict=True):
        if count:
            value.inc(count)
