"""Fuzz target: request paths, from the request line to a storage key (WebDAV and Nix routes).

Input layout: byte 0 picks the method; the rest is the request target after ``/``. It is turned
into a URL the way aiohttp's HTTP parser does, resolved by the real router (the WebDAV, Nix and
rustc routes, registered as the service registers them), then put through the checks each route
makes before it touches storage: ``check_cache_name``, ``dav.normalise`` (WebDAV),
``check_object_path`` (opaque Nix files), ``check_hash_part`` (narinfos), ``parse_nar_name``
(NARs). The raw text also goes to ``dav.normalise`` and ``check_object_path`` directly.

Invariant: each check returns or raises ``FormatError``; whatever passes becomes a storage key
(``core.keys``) that the storage layer accepts (``check_key``, ``check_prefix``) and that stays
under ``caches/<cache>/``. A path that passes the route checks and then fails the storage
check would be a 500 (or worse, a key outside the cache).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aiohttp import web
from yarl import URL

from fuzz.common import instrumented, main, text

with instrumented():
    from larder.core import keys
    from larder.core.nixcache import parse_nar_name
    from larder.errors import FormatError
    from larder.protocol import dav
    from larder.protocol.names import check_cache_name, check_object_path
    from larder.protocol.storepath import check_hash_part
    from larder.service.routes import nix as nix_routes
    from larder.service.routes import rustc as rustc_routes
    from larder.service.routes import webdav as webdav_routes
    from larder.storage.base import check_key, check_prefix

METHODS = ("GET", "PUT", "HEAD", "DELETE", "PROPFIND", "MKCOL", "POST")
LONGEST_CACHE = "c" * 63


class _Target:
    """What the router reads of a request: its method and URL."""

    def __init__(self, method: str, url: URL) -> None:
        self.method = method
        self.rel_url = url


def _router() -> web.UrlDispatcher:
    app = web.Application()
    rustc_routes.add_routes(app)
    webdav_routes.add_routes(app)
    nix_routes.add_routes(app)
    app.router.freeze()
    return app.router


ROUTER = _router()
LOOP = asyncio.new_event_loop()


def _stored(key: str, cache: str) -> None:
    check_key(key)
    assert key.startswith(keys.cache_prefix(cache)), key


def _dav(path_text: str, cache: str) -> None:
    path, _ = dav.normalise(path_text)
    if path:
        _stored(keys.sccache_entry(cache, path), cache)
    check_prefix(keys.sccache_prefix(cache, path))


def _object(path_text: str, cache: str) -> None:
    _stored(keys.extra_file(cache, check_object_path(path_text)), cache)


def _route(handler: Any, match: dict[str, str]) -> None:
    if handler in (webdav_routes.probe_elsewhere, webdav_routes.no_object):
        return  # 404s that read nothing (sccache's probe outside sccache/, a lone name)
    module = getattr(handler, "__module__", "")
    cache = check_cache_name(match["cache"])
    if module == webdav_routes.__name__:
        _dav(match.get("path", ""), cache)
    elif handler in (nix_routes.get_file, nix_routes.put_file):
        _object(match["path"], cache)
    elif handler in (nix_routes.get_narinfo, nix_routes.put_narinfo):
        _stored(keys.narinfo(cache, check_hash_part(match["name"].removesuffix(".narinfo"))), cache)
    elif handler in (nix_routes.get_nar, nix_routes.put_nar):
        _stored(keys.nar(cache, parse_nar_name(match["name"])[0]), cache)


def one_input(data: bytes) -> None:
    if not data:
        return
    method = METHODS[data[0] % len(METHODS)]
    raw = text(data[1:])
    for check in (_dav, _object):
        with contextlib.suppress(FormatError):
            check(raw, LONGEST_CACHE)
    target = "/" + raw
    if any(c in target for c in " \r\n\t\0") or any(ord(c) < 32 or ord(c) == 127 for c in target):
        return  # the HTTP parser refuses such a request line
    path_part, _, _ = target.partition("#")
    path_part, _, query = path_part.partition("?")
    try:
        url = URL.build(path=path_part, query_string=query, encoded=True)
    except ValueError:
        return
    match_info = LOOP.run_until_complete(ROUTER.resolve(_Target(method, url)))  # type: ignore[arg-type]
    if match_info.http_exception is not None:
        return
    with contextlib.suppress(FormatError):
        _route(match_info.handler, dict(match_info))


if __name__ == "__main__":
    main(one_input)
