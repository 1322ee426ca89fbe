"""Which cache a request names, and whether it may do what it asks (shared by every protocol)."""

from __future__ import annotations

from aiohttp import web

from larder.core.caches import CacheSettings
from larder.errors import LarderError, NoSuchCache
from larder.protocol.names import check_cache_name
from larder.protocol.tokens import Scope
from larder.service import state
from larder.service.errors import error_response, status_for
from larder.service.observability.recording import note_cache
from larder.service.routes.bodies import check_declared_length
from larder.service.routes.credentials import check_access


async def cache_for(request: web.Request, needed: Scope) -> CacheSettings:
    """The cache named in the URL, after checking the request may do ``needed`` on it."""
    name = check_cache_name(request.match_info["cache"])
    settings = await request.app[state.CACHES].get(name)
    if settings is None:
        raise NoSuchCache(f"no cache named {name!r}")
    note_cache(request, settings.name)
    await check_access(request, request.app[state.TOKENS], settings, needed)
    return settings


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """Answer ``Expect: 100-continue`` only after auth and size checks pass.

    A client that would be refused learns it before sending a large body.
    """
    if request.headers.get("Expect", "").lower() != "100-continue":
        return error_response(request, 417, "expectation_failed", "unsupported Expect header")
    try:
        await cache_for(request, Scope.WRITE)
        check_declared_length(request, request.app[state.CONFIG].max_upload_size)
    except LarderError as exc:  # the error middleware does not wrap expect handlers
        return error_response(request, status_for(exc), exc.code, exc.message)
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    return None
