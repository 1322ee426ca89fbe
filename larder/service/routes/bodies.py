"""Moving bytes over HTTP: size-limited request bodies in, stored blobs out (with Ranges)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator

from aiohttp import web

from larder.errors import (
    Busy,
    ClientGone,
    NoRoom,
    ServerStopping,
    TooLarge,
    TooSlow,
    UnsupportedEncoding,
)
from larder.protocol.content_coding import CODINGS, body_coding
from larder.service.internals import ZeroCopyFileResponse
from larder.service.progress import send_queue, while_taking
from larder.service.routes.ranges import Unsatisfiable, byte_range
from larder.service.state import CONFIG, DECODING, READING, STORAGE
from larder.storage.base import BlobReader

UPLOAD_CHUNK = 256 * 1024
#: The slowest a request body may come on average once ``body_idle_timeout`` seconds have
#: passed: a client sending a byte within every idle timeout would otherwise hold a connection
#: and a temporary for as long as it likes.
MIN_BODY_RATE = 4 * 1024
#: Largest piece one ``sendfile(2)`` call is asked for.
SENDFILE_CHUNK = 16 * 1024 * 1024


def check_declared_length(request: web.Request, limit: int) -> None:
    """Refuse early when ``Content-Length`` already exceeds ``limit``."""
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"body of {request.content_length} bytes exceeds the limit of {limit}")


#: Codings larder stores in at least as many bytes as they take on the wire: zstd is kept as
#: sent, and xz, bzip2 and brotli pack tighter than the zstd level larder stores at.
_DENSE_CODINGS = frozenset({"zstd", "xz", "bzip2", "br"})
#: The same, as the suffix of a NAR upload's name.
_DENSE_SUFFIXES = (".zst", ".xz", ".bz2", ".br")
#: Seconds after a write found the store full during which every upload declaring more
#: than is free is refused before its body (Nix 2.8 sends a refused upload again, without its
#: body, within seconds: a ``.nar`` of data that packs no smaller then waited for it).
FULL_MEMORY = 300.0


async def check_room(request: web.Request) -> None:
    """Refuse an upload (``PUT``) early, 507, when the store has no room: none at all (the
    backend's floor), or less than its declared size for a body in a dense coding, or for any
    body within :data:`FULL_MEMORY` of a write that found the store full (as the store keeps
    it: every worker and replica on it sees it; an early refusal like this one is no such
    write). A client that sends its upload again without the body (Nix 2.8 after a 5xx) is
    told at once rather than after ``body_idle_timeout``. Otherwise a body (a ``.nar`` stored
    packed smaller than sent) is taken, and a write that finds the store full answers 507."""
    size = request.content_length
    if request.method != "PUT" or size is None:
        return
    coding = CODINGS.get(request.headers.get("Content-Encoding", "").strip().lower())
    dense = coding in _DENSE_CODINGS or request.path.endswith(_DENSE_SUFFIXES)
    storage = request.app[STORAGE]
    if not dense:
        full = await storage.full_since()
        dense = full is not None and abs(time.time() - full) < FULL_MEMORY
    if not await storage.room_for(size if dense else 0):
        raise NoRoom(f"storage is full: no room for a body of {size} bytes")


def body_chunks(request: web.Request, limit: int) -> AsyncIterator[bytes]:
    """The request body in pieces of about ``UPLOAD_CHUNK`` bytes, at most ``limit`` in all.

    Raises :class:`TooLarge` as soon as the limit is passed, whatever the headers said, and
    :class:`TooSlow` when no byte arrives for ``body_idle_timeout`` seconds, or when, past that
    long, the body has come slower than :data:`MIN_BODY_RATE` on average (a client that stalls
    or trickles mid-upload cannot hold a connection and a temporary forever); a body cut short
    by the client
    raises :class:`ClientGone`. Either way the upload is abandoned. A body with a
    ``Content-Encoding`` raises :class:`UnsupportedEncoding` here: routes that decode one use
    :func:`coded_body`. (The application leaves bodies as sent: ``auto_decompress`` is off.)
    """
    if body_coding(request.headers.get("Content-Encoding")) != "none":
        raise UnsupportedEncoding("this resource takes no Content-Encoding")
    return _chunks(request, limit)


def coded_body(request: web.Request, limit: int) -> tuple[str, AsyncIterator[bytes]]:
    """The body as :func:`body_chunks` reads it, still coded, with the name of the decoder
    of its ``Content-Encoding`` (``none`` when it has none)."""
    return body_coding(request.headers.get("Content-Encoding")), _chunks(request, limit)


async def _chunks(request: web.Request, limit: int) -> AsyncIterator[bytes]:
    check_declared_length(request, limit)
    await check_room(request)
    reading = request.app[READING]
    reading[id(request)] = request  # (a request is a mapping: not hashable)
    try:
        async for chunk in _read_chunks(request, limit):
            yield chunk
    finally:
        reading.pop(id(request), None)


def stop_reading(app: web.Application) -> None:
    """The server is stopping: every body still arriving ends now with :class:`ServerStopping`
    (answered 503), as aiohttp reads no more bytes of a connection once its shutdown began: the
    route would otherwise wait for the rest until the shutdown timeout and answer nothing."""
    reading: dict[int, web.Request] = app[READING]
    for request in list(reading.values()):
        request.content.set_exception(
            ServerStopping("the server is stopping before the body arrived; send it again")
        )


async def _read_chunks(request: web.Request, limit: int) -> AsyncIterator[bytes]:
    idle = request.app[CONFIG].body_idle_timeout
    pieces: list[bytes] = []
    pending = total = 0
    started = time.monotonic()
    while True:
        try:
            data = await asyncio.wait_for(request.content.readany(), idle)
        except TimeoutError:
            raise TooSlow(f"no body bytes for {idle:g} seconds") from None
        except ConnectionResetError:
            raise ClientGone("the client closed the connection mid-body") from None
        if not data:
            break
        total += len(data)
        if total < (time.monotonic() - started - idle) * MIN_BODY_RATE:
            raise TooSlow(f"the body came slower than {MIN_BODY_RATE // 1024} KiB/s")
        if total > limit:
            raise TooLarge(f"body exceeds the limit of {limit} bytes")
        pieces.append(data)
        pending += len(data)
        if pending >= UPLOAD_CHUNK:
            yield b"".join(pieces)  # one copy at most (a single piece is returned as is)
            pieces.clear()
            pending = 0
    if pieces:
        yield b"".join(pieces)


async def read_document(request: web.Request, limit: int) -> bytes:
    """A small body (narinfo, JSON) read whole, at most ``limit`` bytes."""
    return b"".join([chunk async for chunk in body_chunks(request, limit)])


async def read_coded_document(request: web.Request, limit: int) -> tuple[str, bytes]:
    """A small body read whole and still coded (at most ``limit`` bytes as sent), with the
    decoder name of its ``Content-Encoding``."""
    coding, chunks = coded_body(request, limit)
    return coding, b"".join([chunk async for chunk in chunks])


async def _send(
    request: web.Request, response: web.StreamResponse, chunks: AsyncIterable[bytes]
) -> None:
    """Write ``chunks`` as the body of a prepared ``response``.

    Once the headers are out a failure (storage unreachable mid-stream) can no longer become an
    error status: the connection is closed, so the client sees a body shorter than its
    ``Content-Length`` at once (and retries) rather than waiting for bytes that never come. A
    client that takes nothing for ``body_idle_timeout`` is dropped (:class:`TooSlow`), as a
    ``sendfile`` download is, and one that went away is :class:`ClientGone`, not a server
    error; either way ``chunks`` is closed at once (a decoder and an open blob are let go).
    """
    idle = request.app[CONFIG].body_idle_timeout
    try:
        async with contextlib.aclosing(_closable(chunks)) as pieces:
            async for chunk in pieces:
                await while_taking(response.write(chunk), request.transport, idle)
    except BaseException as exc:
        transport = request.transport
        if isinstance(exc, TimeoutError):
            if transport is not None:
                transport.abort()  # close() would wait to flush to a client that reads nothing
            raise TooSlow(f"the client took nothing for {idle:g} s") from None
        if transport is not None:
            transport.close()
        if isinstance(exc, ConnectionError):
            raise ClientGone("the client went away during the download") from None
        raise


def _closable(chunks: AsyncIterable[bytes]) -> AsyncGenerator[bytes, None]:
    """``chunks`` as an iterator with ``aclose`` (an async generator already is one)."""
    if hasattr(chunks, "aclose"):
        return chunks  # type: ignore[return-value]

    async def each() -> AsyncGenerator[bytes, None]:
        async for chunk in chunks:
            yield chunk

    return each()


def _requested_span(request: web.Request, size: int, *, dated: bool) -> tuple[int, int] | None:
    """``(start, stop)`` of the byte range a ``GET`` asks of a ``size``-byte blob, ``None`` for
    the whole blob (:mod:`.ranges`); 416 when it is unsatisfiable.

    An ``If-Range`` makes the range conditional on a validator: an entity tag is never taken (no
    answer here carries one aiohttp compares), a date only when ``dated`` (the file response
    sends ``Last-Modified`` and compares it itself).
    """
    value = request.headers.get("Range")
    if value is None or request.method != "GET":
        return None
    if_range = request.headers.get("If-Range")
    if if_range is not None and (not dated or request.if_range is None):
        return None
    try:
        return byte_range(value, size)
    except Unsatisfiable:
        raise web.HTTPRequestRangeNotSatisfiable(
            headers={"Content-Range": f"bytes */{size}"}
        ) from None


async def serve_blob(
    request: web.Request, reader: BlobReader, headers: dict[str, str]
) -> web.StreamResponse:
    """Send a blob's stored bytes with ``Accept-Ranges``; local files go out by sendfile."""
    headers = {"Accept-Ranges": "bytes", **headers}
    if reader.local_path is not None:
        try:
            span = _requested_span(request, reader.stored_size, dated=True)
        finally:
            await reader.close()
        idle = request.app[CONFIG].body_idle_timeout
        wanted = None if span is None else f"bytes={span[0]}-{span[1] - 1}"
        return ZeroCopyFileResponse(reader.local_path, idle, send_file, wanted, headers=headers)
    try:
        size = reader.stored_size
        span = _requested_span(request, size, dated=False)
        start, stop = span or (0, size)
        response = web.StreamResponse(status=206 if span else 200, headers=headers)
        if span:
            response.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
        response.content_length = stop - start
        await response.prepare(request)
        if request.method != "HEAD":
            await _send(request, response, reader.chunks(start, stop))
        await response.write_eof()
        return response
    finally:
        await reader.close()


#: A generated body at least this long is a *large* one (:func:`serve_stream`): decoding it
#: holds up to the stored stream's window (8 MiB) and a read-ahead while its client reads.
LARGE_GENERATED = 1024**2
#: Large generated bodies one server process sends at once for one cache, so clients that stop
#: reading cannot make a process hold more than about this many decoders per cache (~300 MiB).
#: One more waits up to :data:`SLOT_WAIT` seconds for a slot, then is 503 (with
#: ``Retry-After``). Per cache: clients stalling on a public cache take nothing from a private
#: cache's users. Nix downloads ``.nar.zst`` (sent as stored) and is never counted; a small
#: sccache entry or log is not either.
MAX_LARGE_GENERATED = 32
SLOT_WAIT = 5.0


async def serve_stream(
    request: web.Request,
    chunks: AsyncIterable[bytes] | None,
    length: int,
    headers: dict[str, str],
) -> web.StreamResponse:
    """Send a generated body of known ``length`` (no ranges); ``chunks`` is None for HEAD.

    ``chunks`` is closed whatever happens. A large body (:data:`LARGE_GENERATED`) waits for
    one of its cache's :data:`MAX_LARGE_GENERATED` slots, else is :class:`~larder.errors.Busy`
    before any header is sent; a client gone before the headers went is :class:`ClientGone`."""
    try:
        if chunks is None or request.method == "HEAD" or length < LARGE_GENERATED:
            return await _serve_stream(request, chunks, length, headers)
        cache = request.match_info.get("cache", "")
        slots = request.app[DECODING].setdefault(cache, asyncio.Semaphore(MAX_LARGE_GENERATED))
        try:
            async with asyncio.timeout(SLOT_WAIT):
                await slots.acquire()
        except TimeoutError:
            raise Busy(
                f"{MAX_LARGE_GENERATED} large decoded downloads of this cache at once already"
            ) from None
        try:
            return await _serve_stream(request, chunks, length, headers)
        finally:
            slots.release()
    finally:
        if chunks is not None:
            await _closable(chunks).aclose()


async def _serve_stream(
    request: web.Request,
    chunks: AsyncIterable[bytes] | None,
    length: int,
    headers: dict[str, str],
) -> web.StreamResponse:
    response = web.StreamResponse(headers=headers)
    response.content_length = length
    try:
        await response.prepare(request)
    except ConnectionError:
        raise ClientGone("the client went away before the download began") from None
    if request.method != "HEAD" and chunks is not None:
        await _send(request, response, chunks)
    await response.write_eof()
    return response


class SendFailed(ConnectionResetError):
    """A ``sendfile`` transfer ended early, after ``sent`` bytes."""

    def __init__(self, message: str, sent: int) -> None:
        super().__init__(message)
        self.sent = sent


async def send_file(
    loop: asyncio.AbstractEventLoop, sock_fd: int, file_fd: int, offset: int, count: int,
    idle: float,
) -> int:  # fmt: skip
    """``count`` bytes of ``file_fd`` from ``offset`` to the non-blocking socket ``sock_fd``;
    returns ``count``, or raises :class:`SendFailed` saying how many bytes went.

    Each time the socket can take more, the loop's writer callback calls ``sendfile(2)`` itself
    (at most :data:`SENDFILE_CHUNK` bytes per callback, so one fast reader cannot hold the loop),
    rather than waking a task that then calls it: one loop iteration per refill, as in asyncio's
    own ``loop.sendfile``. Gives up once the client takes nothing for ``idle`` seconds: no
    byte sent and the socket's send queue no shorter (a steady slow reader waits long for the
    socket to take more, which it does only once a third of its queue has left).
    """
    error: OSError | None = None
    out = os.dup(sock_fd)
    done: asyncio.Future[None] = loop.create_future()
    position, left = offset, count
    last_progress = time.monotonic()
    queued = send_queue(out)
    timer: asyncio.TimerHandle | None = None

    def finish(failure: OSError | None) -> None:
        nonlocal error
        if not done.done():
            error = failure
            done.set_result(None)

    def step() -> None:
        nonlocal position, left, last_progress, queued
        if done.done():
            return
        try:
            sent = os.sendfile(out, file_fd, position, min(left, SENDFILE_CHUNK))
        except BlockingIOError:
            return
        except OSError as exc:
            finish(exc)
            return
        if sent == 0:
            finish(ConnectionResetError("the file ended early or the connection closed"))
            return
        position += sent
        left -= sent
        last_progress = time.monotonic()
        queued = send_queue(out)
        if left <= 0:
            finish(None)

    def watch() -> None:
        nonlocal timer, last_progress, queued
        now = time.monotonic()
        if now - last_progress >= idle:
            before, queued = queued, send_queue(out)
            if queued is None or before is None or queued >= before:
                finish(ConnectionResetError(f"the client took nothing for {idle:g} seconds"))
                return
            last_progress = now  # it took some of what the socket holds
        timer = loop.call_later(idle - (now - last_progress), watch)

    try:
        step()
        if not done.done():
            loop.add_writer(out, step)
            timer = loop.call_later(idle, watch)
        await done
    finally:
        if timer is not None:
            timer.cancel()
        loop.remove_writer(out)
        os.close(out)
    if error is not None:
        raise SendFailed(str(error), count - left) from error
    return count
