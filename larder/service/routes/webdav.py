"""The sccache WebDAV backend under ``/<cache>/sccache/`` (``SCCACHE_WEBDAV_ENDPOINT``).

=====================  ===========================================================================
``GET|HEAD <path>``    200 with the entry's bytes, 404 on a miss (how sccache reads)
``PUT <path>``         store an entry (201); needs a write token; 413 over ``max_upload_size``
``DELETE <path>``      204, or 404 when there is no entry; 405 on a collection
``PROPFIND <path>``    207: Depth 0 describes the resource, Depth 1 adds its children (at most
                       1,000, from one level of the store, never the keys below it); a path
                       ending in ``/`` is a collection and always exists, one without it
                       is a collection when it holds anything; ``Depth: infinity``
                       (also a missing Depth) is refused with 403, as RFC 4918 allows
``MKCOL <path>/``      201 (collections are virtual), 405 when an entry has that name
``OPTIONS <path>``     200 with ``DAV: 1`` and ``Allow`` (no locks, copies or moves: 405)
=====================  ===========================================================================

A path that is not a valid :func:`~larder.protocol.dav.normalise` path is a 400 for every
method but sccache's probe. sccache (0.16 and 0.17 alike) starts with ``GET`` then ``PUT
<prefix>/.sccache_check``; a refused PUT (401/403) makes it read-only, which is how a client
without a write token behaves. A failed probe GET other than 404 stops its server, and the build
with it, so a cache costs hits, never builds: the probe GET is a 404 when the client has no
valid read token for a private cache (nothing is revealed: the probe is the same everywhere),
when its path is not valid, and while storage is unavailable; the probe PUT is a 403 saying why
when the key prefix could hold no entry (``a/b/c/<key>`` below it: characters outside the set,
too many levels or characters) and while storage is unavailable. sccache then runs read-only,
and each lookup fails as usual (401/403/400/503), which it counts as a miss while the build
goes on. Before writing ``a/b/c/<key>`` its WebDAV client asks ``PROPFIND`` (Depth 0) for the
parent; it would ``MKCOL`` missing levels, but virtual collections are never missing. Tokens as
for the Nix routes: Bearer (``SCCACHE_WEBDAV_TOKEN``) or the Basic password
(``SCCACHE_WEBDAV_PASSWORD``, with any user name: sccache sends no credentials without one).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import web

from larder.core.blobs import decompressed
from larder.core.sccache import is_probe, probe_problem
from larder.errors import Forbidden, FormatError, StorageError, Unauthorized
from larder.protocol.dav import Resource, multistatus, normalise
from larder.protocol.names import RESERVED_NAMES
from larder.protocol.tokens import Scope
from larder.service import state
from larder.service.observability.recording import note_lookup, note_upload
from larder.service.routes.bodies import body_chunks, serve_stream
from larder.service.routes.cache_access import cache_for, expect_upload

MULTISTATUS_TYPE = "application/xml"
#: The methods of ``sccache/`` (``OPTIONS`` says so).
ALLOWED = "GET, HEAD, PUT, DELETE, MKCOL, PROPFIND, OPTIONS"


def _path(request: web.Request) -> tuple[str, bool]:
    return normalise(request.match_info.get("path", ""))


def _mount(request: web.Request) -> str:
    """The path larder is served under, as clients see it: ``public_url``'s (``/larder`` for
    ``https://host/larder`` behind a reverse proxy's prefix), else none."""
    return urlsplit(request.app[state.CONFIG].public_url).path.rstrip("/")


def _href(request: web.Request, path: str, collection: bool) -> str:
    base = f"{_mount(request)}/{request.match_info['cache']}/sccache/"
    return base + path + ("/" if collection and path else "")


async def get_entry(request: web.Request) -> web.StreamResponse:
    raw = request.match_info.get("path", "")
    if is_probe(raw):
        try:
            return await _get_entry(request)
        except (Unauthorized, Forbidden, FormatError, StorageError) as exc:
            # Anything but 200/404 here stops sccache and fails the build (module docstring).
            why = "storage is unavailable" if isinstance(exc, StorageError) else str(exc)
            raise web.HTTPNotFound(text=f"not found ({why})\n") from None
    return await _get_entry(request)


async def _get_entry(request: web.Request) -> web.StreamResponse:
    path, collection = _path(request)
    settings = await cache_for(request, Scope.READ)
    store = request.app[state.SCCACHE]
    entry = None if collection else await store.get(settings, path)
    if not is_probe(path) and not collection and request.method == "GET":
        note_lookup(request, "entry", entry is not None)  # a probe or a HEAD is no lookup
    if entry is None:
        raise web.HTTPNotFound()
    headers = {"Content-Type": "application/octet-stream"}
    if request.method == "HEAD":
        return await serve_stream(request, None, entry.size, headers)
    reader = await store.open(entry)
    if reader is None:
        raise web.HTTPNotFound()
    return await serve_stream(
        request, decompressed(reader, entry.size, entry.blob_id), entry.size, headers
    )


async def put_entry(request: web.Request) -> web.Response:
    note_upload(request)
    raw = request.match_info.get("path", "")
    if not is_probe(raw):
        return await _put_entry(request, None)
    try:
        return await _put_entry(request, probe_problem(raw))
    except StorageError:
        message = "storage is unavailable; sccache runs read-only until it starts again"
        raise Forbidden(message) from None


async def _put_entry(request: web.Request, problem: str | None) -> web.Response:
    """The PUT; ``problem``: why the key prefix of the probe being put can hold no entry."""
    settings = await cache_for(request, Scope.WRITE)
    if problem is not None:
        raise Forbidden(f"{problem}; sccache runs read-only")  # module docstring
    path, collection = _path(request)
    if collection or not path:
        raise FormatError("PUT needs an entry path, not a collection")
    limit = request.app[state.CONFIG].max_upload_size
    await request.app[state.SCCACHE].put(settings, path, body_chunks(request, limit))
    return web.Response(status=201)


async def delete_entry(request: web.Request) -> web.Response:
    settings = await cache_for(request, Scope.WRITE)
    path, collection = _path(request)
    if collection:
        return web.Response(
            status=405, headers={"Allow": "PROPFIND, MKCOL"}, text="collections are virtual\n"
        )
    if not await request.app[state.SCCACHE].delete(settings, path):
        raise web.HTTPNotFound()
    return web.Response(status=204)


async def mkcol(request: web.Request) -> web.Response:
    settings = await cache_for(request, Scope.WRITE)
    path, _ = _path(request)
    if request.content_length:
        return web.Response(status=415, text="MKCOL with a body is not supported\n")
    if path and await request.app[state.SCCACHE].get(settings, path) is not None:
        return web.Response(status=405, text="an entry has that name\n")
    return web.Response(status=201)


async def propfind(request: web.Request) -> web.Response:
    settings = await cache_for(request, Scope.READ)
    depth = request.headers.get("Depth", "infinity").strip().lower()
    if depth not in ("0", "1"):
        return web.Response(status=403, text="PROPFIND Depth must be 0 or 1\n")
    path, collection = _path(request)
    store = request.app[state.SCCACHE]
    entry = None if collection else await store.get(settings, path)
    # A collection may be named without its trailing slash (RFC 4918 clients do).
    if not collection and entry is None and not await store.has_children(settings, path):
        raise web.HTTPNotFound()
    if entry is not None:
        resources = [Resource(_href(request, path, False), False, entry.size, entry.modified)]
    else:
        resources = [Resource(_href(request, path, True), True)]
        if depth == "1":
            for name, child in await store.children(settings, path):
                child_path = f"{path}/{name}" if path else name
                if child is None:
                    resources.append(Resource(_href(request, child_path, True), True))
                else:
                    href = _href(request, child_path, False)
                    resources.append(Resource(href, False, child.size, child.modified))
    return web.Response(
        status=207, body=multistatus(resources), content_type=MULTISTATUS_TYPE, charset="utf-8"
    )


async def options(request: web.Request) -> web.Response:
    """What this WebDAV subset offers (class 1, without locks), for clients that ask first."""
    await cache_for(request, Scope.READ)
    return web.Response(headers={"DAV": "1", "Allow": ALLOWED, "MS-Author-Via": "DAV"})


async def elsewhere(request: web.Request) -> web.Response:
    """WebDAV sent to a cache outside ``sccache/`` (an endpoint missing that segment, which
    sccache takes as read-only without saying why): a 405 that names the right endpoint."""
    settings = await cache_for(request, Scope.READ)  # 404 for what is not a cache
    where = f"{_mount(request)}/{settings.name}/sccache/"
    message = f"WebDAV is served under {where} (SCCACHE_WEBDAV_ENDPOINT)"
    rustc = request.match_info.get("path", "").startswith("rustc/")
    allow = "GET, HEAD, PUT, POST" if rustc else "GET, HEAD, PUT"  # what the routes there take
    return web.Response(status=405, headers={"Allow": allow}, text=message + "\n")


async def probe_elsewhere(request: web.Request) -> web.Response:
    """sccache's start-up probe GET outside ``sccache/`` (an endpoint naming only the server or
    the cache): a 404 whatever the credentials, as under ``sccache/``, so the client starts
    (read-only, once its PROPFIND gets the 405 above) instead of stopping the build."""
    where = f"{_mount(request)}/<cache>/sccache/"
    message = f"not found: WebDAV is served under {where} (SCCACHE_WEBDAV_ENDPOINT)"
    raise web.HTTPNotFound(text=message + "\n")


async def no_object(request: web.Request) -> web.Response:
    """``GET /<name>`` and ``/<name>/``: no object is there (a 405 because the WebDAV routes
    above take other methods at that path would read as "the server cannot")."""
    raise web.HTTPNotFound(text="not found: a cache's objects are under /<cache>/...\n")


def add_routes(app: web.Application) -> None:
    """Register the WebDAV routes (before the Nix catch-all)."""
    router = app.router
    for pattern in ("/{cache}/sccache", "/{cache}/sccache/{path:.*}"):
        router.add_get(pattern, get_entry)
        router.add_route("PUT", pattern, put_entry, expect_handler=expect_upload)
        router.add_route("DELETE", pattern, delete_entry)
        router.add_route("MKCOL", pattern, mkcol)
        router.add_route("PROPFIND", pattern, propfind)
        router.add_route("OPTIONS", pattern, options)
    # Not on the service's own first segments (/api, /metrics, ...), whose 405s stay theirs.
    cache = "{cache:(?!(?:" + "|".join(sorted(RESERVED_NAMES)) + ")(?:/|$))[^/]+}"
    # At any depth: the server only, a cache, a cache and a key prefix.
    router.add_get(r"/{probe:(?:[^/]+/)*\.sccache_check/?}", probe_elsewhere)
    for pattern in (f"/{cache}", f"/{cache}/", f"/{cache}/{{path:.*}}"):
        for method in ("PROPFIND", "MKCOL"):
            router.add_route(method, pattern, elsewhere)
    for pattern in (f"/{cache}", f"/{cache}/"):
        router.add_get(pattern, no_object)
