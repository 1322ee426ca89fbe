"""JSON API under ``/api/v1`` and the liveness probe."""

from __future__ import annotations

import asyncio

from aiohttp import web

from larder.errors import StorageFull, StorageUnavailable
from larder.protocol.tokens import Scope
from larder.service import state
from larder.service.config import format_listen
from larder.service.routes.cache_access import cache_for
from larder.service.state import HITS, TALLY

#: Seconds /readyz waits for the storage backend to answer.
READY_TIMEOUT = 5.0


def substituter_url(request: web.Request, cache: str) -> str:
    """The URL laptops list in ``substituters``: the configured public URL, else the host the
    request named, else (an HTTP/1.0 request without ``Host``) the address and port it reached."""
    base = request.app[state.CONFIG].public_url
    if not base:
        host = request.headers.get("Host") or _local_address(request) or request.host
        base = f"{request.scheme}://{host}"
    return f"{base}/{cache}"


def _local_address(request: web.Request) -> str | None:
    name = request.transport.get_extra_info("sockname") if request.transport else None
    if not isinstance(name, tuple) or len(name) < 2:
        return None
    return format_listen(str(name[0]), int(name[1]))


async def get_cache(request: web.Request) -> web.Response:
    settings = await cache_for(request, Scope.READ)
    return web.json_response(
        {
            "name": settings.name,
            "public_key": settings.public_key.to_string(),
            "substituter": substituter_url(request, settings.name),
            "private": settings.private,
            "priority": settings.priority,
        }
    )


async def get_stats(request: web.Request) -> web.Response:
    """Hit rates over the last hour and day per protocol, the most-missed crates (each with its
    main reason), rustc misses by the category larder-rustc explained them with, the store
    paths asked for most that are still missing, and those uploaded after they were asked for
    (with how often they were asked for before).

    Counted in memory by the replica (with ``workers`` > 1: the worker process) that answers,
    since it started.
    """
    settings = await cache_for(request, Scope.READ)
    request.app[TALLY].flush()
    hits = request.app[HITS]
    return web.json_response(
        {
            "cache": settings.name,
            "scope": hits.scope,
            "protocols": hits.rates(settings.name),
            "top_missed_crates": hits.top_missed(settings.name),
            "rustc_misses_by_category": hits.misses_by_category(settings.name),
            "top_missing_store_hashes": hits.top_missing(settings.name),
            "pushed_late": hits.pushed_late(settings.name),
        }
    )


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    """200 only when the storage backend answers, within :data:`READY_TIMEOUT` seconds (503 with
    Retry-After otherwise: a hung endpoint must not hold the probe for its retries). A full
    store answers, and serves every read: it stays ready (its uploads get 507)."""
    try:
        await asyncio.wait_for(request.app[state.STORAGE].check(), READY_TIMEOUT)
    except TimeoutError:
        raise StorageUnavailable(f"storage did not answer within {READY_TIMEOUT:g} s") from None
    except StorageFull:
        return web.Response(text="ready; storage full\n")
    return web.Response(text="ready\n")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/api/v1/caches/{cache}", get_cache)
    app.router.add_get("/api/v1/caches/{cache}/stats", get_stats)
