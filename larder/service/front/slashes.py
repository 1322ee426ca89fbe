"""Repeated slashes in a request's path, merged before routing (``//main/x.narinfo`` is
``/main/x.narinfo``), as nginx and static file servers read them.

A substituter or ``LARDER_URL`` written as ``"${BASE}/main"`` with ``BASE`` ending in ``/`` gives
``http://larder//main``; Nix 2.8 strips only one trailing slash (``.../main//``). Every name
larder stores is made of non-empty segments, so no two stored objects differ by a repeated
slash; the query string is left as it came.

Only a path whose first segment then names a cache is merged: ``//metrics`` and ``//api/...``
stay as sent (404), so a proxy in front whose rule hides ``/metrics`` by its prefix, without
merging slashes itself (HAProxy's ``path_beg``), is not walked around.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http import RawRequestMessage
from yarl import URL

from larder.errors import FormatError
from larder.protocol.names import check_cache_name

_REPEATED = re.compile(r"/{2,}")

#: What :class:`aiohttp.web.Server` calls to make a request from a parsed head.
RequestFactory = Callable[..., web.BaseRequest]


def merged(target: str) -> str:
    """``target`` (a request target in origin form) with each run of ``/`` in its path one,
    when the path then begins with a cache's name; else ``target`` as it is."""
    path, mark, query = target.partition("?")
    path = _REPEATED.sub("/", path)
    try:
        check_cache_name(path.split("/", 2)[1])
    except FormatError:
        return target  # /metrics, /api/..., /healthz: reached by their own spelling only
    return path + mark + query


def merging_slashes(factory: RequestFactory) -> RequestFactory:
    """``factory`` making each request from its head with the path's repeated slashes merged
    (a target not in origin form, ``*`` or ``http://...``, is left as it came)."""

    def make(message: RawRequestMessage, *args: Any, **kwargs: Any) -> web.BaseRequest:
        target = message.path
        if "//" in target.partition("?")[0] and target.startswith("/"):
            merged_target = merged(target)
            if merged_target != target:
                message = message._replace(path=merged_target, url=URL(merged_target, encoded=True))
        return factory(message, *args, **kwargs)

    return make
