"""What a shared cache in front of larder (a CDN, nginx's ``proxy_cache``) may keep: the
``Cache-Control`` of every answer (RFC 9111).

- A public cache's NAR at the URL its narinfos give (``nar/<hash>.nar.zst``) is named by its
  content and is kept :data:`NAR_MAX_AGE`, ``immutable``.
- Its narinfos, ``nix-cache-info``, other Nix objects (``.ls``, ``log/``...) and NARs under
  other names (``.nar``, the name an upload came under) are kept :data:`NARINFO_MAX_AGE`: a
  collection, a damaged narinfo replaced or a key rotated reach clients that soon, and a pusher
  asking whether a NAR is there (``HEAD``, answered by a proxy from a kept ``GET``) learns it
  was collected.
- Every answer of a private cache is ``private``: a shared cache never keeps it. (nginx keys its
  cache by URL alone, so a kept answer would go to the next client, whatever its token.)
- Everything else is ``no-store`` (:func:`default_no_store`): a miss, so that a push is seen at
  once (Nix keeps misses itself, ``narinfo-cache-negative-ttl``, an hour by default); errors;
  the answers to uploads; the API, metrics and health; the rustc and sccache routes, which their
  clients reach directly.

A cache made private while a shared cache holds its public answers does not take them back,
and servers answer as public for up to ``refresh_interval`` after: purge the proxy once that has
passed (docs/operating.md).
"""

from __future__ import annotations

from aiohttp import web

#: Seconds a shared cache may keep a public cache's NAR: a year (the name is the content's).
NAR_MAX_AGE = 365 * 24 * 3600
#: Seconds a shared cache may keep a public cache's narinfo or other Nix object.
NARINFO_MAX_AGE = 60
NO_STORE = "no-store"


def kept(private: bool, max_age: int, immutable: bool = False) -> dict[str, str]:
    """The ``Cache-Control`` header of an answer that may be kept ``max_age`` seconds, by the
    client alone when it is a ``private`` cache's."""
    value = f"{'private' if private else 'public'}, max-age={max_age}"
    return {"Cache-Control": value + (", immutable" if immutable else "")}


async def default_no_store(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: an answer that says nothing of caching is ``no-store``."""
    if "Cache-Control" not in response.headers:
        response.headers["Cache-Control"] = NO_STORE
