"""Which cache a request names, and whether it may do what it asks (shared by every protocol)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from larder.core.caches import CacheSettings
from larder.errors import Forbidden, LarderError, NoSuchCache, Unauthorized
from larder.protocol.names import RESERVED_NAMES, check_cache_name
from larder.protocol.tokens import Scope
from larder.service import state
from larder.service.errors import error_response, status_for
from larder.service.observability.recording import (
    count_early_answer,
    note_cache,
    note_refused,
    note_upload,
    note_writer,
)
from larder.service.routes.bodies import check_declared_length, check_room
from larder.service.routes.credentials import check_access, could_write


async def cache_for(request: web.Request, needed: Scope) -> CacheSettings:
    """The cache named in the URL, after checking the request may do ``needed`` on it."""
    name = request.match_info["cache"]
    if name in RESERVED_NAMES:  # /api/v2/..., /metrics/x: a route that does not exist
        raise NoSuchCache(f"no route {request.path[:80]!r}")
    check_cache_name(name)
    settings = await request.app[state.CACHES].get(name)
    if settings is None:
        raise NoSuchCache(f"no cache named {name!r}")
    note_cache(request, settings.name)
    authority = request.app[state.TOKENS]
    try:
        await check_access(request, authority, settings, needed)
    except (Unauthorized, Forbidden):
        note_refused(request, str(needed))  # a laptop without its read token shows here
        raise
    credentials = request.headers.getall("Authorization", [])
    if (
        needed == Scope.READ
        and len(credentials) == 1
        and await could_write(authority, request.app[state.ROLES], credentials[0], settings)
    ):
        note_writer(request)  # its lookups are CI's, counted apart from the readers'
    return settings


def expect_continue_for(
    needed: Scope, *, upload: bool = False
) -> Callable[[web.Request], Awaitable[web.StreamResponse | None]]:
    """An ``expect_handler`` that answers ``Expect: 100-continue`` only once the request may do
    ``needed`` on its cache and its declared size is within the limit: a client that would be
    refused learns it before sending its body. ``upload``: the route stores what it is sent, and
    a refusal here is counted as an upload's outcome (curl, so Nix, asks before any body over
    1 MiB: most NARs)."""

    async def expect(request: web.Request) -> web.StreamResponse | None:
        start = time.monotonic()
        if upload:
            note_upload(request)
        if request.headers.get("Expect", "").lower() != "100-continue":
            return _refused(request, start, 417, "expectation_failed", "unsupported Expect header")
        try:
            await cache_for(request, needed)
            check_declared_length(request, request.app[state.CONFIG].max_upload_size)
            await check_room(request)
        except LarderError as exc:  # the error middleware does not wrap expect handlers
            return _refused(request, start, status_for(exc), exc.code, exc.message)
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return None

    return expect


def _refused(
    request: web.Request, start: float, status: int, code: str, message: str
) -> web.Response:
    """An expect handler's refusal, counted (no middleware sees it)."""
    count_early_answer(request, status, code, time.monotonic() - start)
    return error_response(request, status, code, message)


#: Uploads: the handler of every ``PUT``.
expect_upload = expect_continue_for(Scope.WRITE, upload=True)
