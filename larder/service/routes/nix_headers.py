"""The headers of the Nix answers, defined once for the routes (:mod:`.nix`) and the short path
(:mod:`larder.service.front.short_path`), which writes them as aiohttp does (:func:`head_lines`).

A change to what a narinfo, ``nix-cache-info`` or NAR answer carries is made here, and both
readers send it; ``tests/service/test_fastpath*.py`` compare their answers byte for byte. Each
carries the ``Cache-Control`` of :mod:`larder.service.cache_control` for a public or a
``private`` cache.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from http import HTTPStatus

from larder.service.cache_control import NAR_MAX_AGE, NARINFO_MAX_AGE, NO_STORE, kept

NARINFO_TYPE = "text/x-nix-narinfo"
NAR_TYPE = "application/x-nix-nar"
CACHE_INFO_TYPE = "text/x-nix-cache-info"


#: The headers a narinfo miss is raised with (``web.HTTPNotFound`` adds its text's type and
#: length after them): the short path writes the same, in that order.
MISS_HEADERS = {"Cache-Control": NO_STORE}


def narinfo_headers(private: bool) -> dict[str, str]:
    """A narinfo answer's headers (GET and HEAD)."""
    return {"Content-Type": NARINFO_TYPE, **kept(private, NARINFO_MAX_AGE)}


def cache_info_headers(private: bool) -> dict[str, str]:
    """``nix-cache-info``'s headers."""
    return {"Content-Type": CACHE_INFO_TYPE, **kept(private, NARINFO_MAX_AGE)}


def nar_headers(private: bool, larders_own: bool = True) -> dict[str, str]:
    """A NAR answer's own headers (a file response adds ``Accept-Ranges`` and its validators).
    Only the URL larder's narinfos give (``larders_own``) is kept long: the names Nix uploads
    under (``.nar`` too, an uncompressed upload's) are what a pusher asks about before
    uploading, and a kept answer would make it skip the upload of a NAR since collected."""
    if not larders_own:
        return {"Content-Type": NAR_TYPE, **kept(private, NARINFO_MAX_AGE)}
    return {"Content-Type": NAR_TYPE, **kept(private, NAR_MAX_AGE, immutable=True)}


#: Media types an opaque object (``.ls``, ``log/``, ``realisations/``...) keeps from its upload;
#: Nix sends these. Any other is served as ``application/octet-stream``: a writer must not make
#: the cache's origin serve a page a browser runs (``text/html``, ``image/svg+xml``).
OPAQUE_TYPES = frozenset(
    {
        "application/json",
        "application/octet-stream",
        "application/x-nix-nar",
        "text/plain",
        "text/x-nix-cache-info",
        NARINFO_TYPE,
    }
)
_CHARSET = re.compile(r'\s*charset="?([A-Za-z0-9._-]{1,40})"?\s*', re.IGNORECASE)


def opaque_type(content_type: str) -> str:
    """The ``Content-Type`` an opaque object is stored and served with, from the one it came
    with: a type of :data:`OPAQUE_TYPES` (with its ``charset``, if that is a plain name), else
    ``application/octet-stream``."""
    media, _, parameters = content_type.partition(";")
    media = media.strip().lower()
    if media not in OPAQUE_TYPES:
        return "application/octet-stream"
    charset = _CHARSET.fullmatch(parameters)
    return f"{media}; charset={charset.group(1).lower()}" if charset else media


def opaque_headers(content_type: str, private: bool) -> dict[str, str]:
    """An opaque object's answer headers: its type (:func:`opaque_type`), never sniffed."""
    return {
        "Content-Type": opaque_type(content_type),
        "X-Content-Type-Options": "nosniff",
        **kept(private, NARINFO_MAX_AGE),
    }


def head_lines(status: int, headers: Mapping[str, str], length: int | None) -> bytes:
    """The status line, ``headers`` and ``Content-Length`` (unless ``None``), as aiohttp writes
    them before ``Date`` and ``Server``."""
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in headers.items()]
    if length is not None:
        lines.append(f"Content-Length: {length}\r\n")
    return "".join(lines).encode("latin-1")
