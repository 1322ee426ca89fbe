"""The WebDAV subset sccache's WebDAV backend speaks (RFC 4918, as OpenDAL's client uses it).

Paths: the part of the request path after ``/<cache>/sccache/``. Empty segments (``a//b``) are
collapsed; ``.`` and ``..`` segments (also percent-encoded, which the URL decoder has already
turned into dots) and characters outside ``[A-Za-z0-9._:!+=@-]`` are refused, so a path can
never leave the cache's namespace. A segment has at most 255 characters (a file name on disk
storage), a path at most :data:`MAX_SEGMENTS` segments and
:data:`MAX_PATH_LENGTH` characters once collapsed (sccache's are about 70 plus its key prefix;
the bound keeps ``caches/<cache>/sccache/<path>`` a valid storage key for any cache name).
A path that ends in ``/`` (or is empty) names a collection.

``PROPFIND`` answers ``207 Multi-Status`` with one ``<D:response>`` per resource: a collection
has ``<D:resourcetype><D:collection/></D:resourcetype>``; an entry has an empty resourcetype
and ``getcontentlength``. Every response carries ``getlastmodified`` (RFC 1123 date): some
clients (OpenDAL's, in sccache 0.16) fail to parse a response without it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from email.utils import formatdate
from typing import Final, NamedTuple
from urllib.parse import quote
from xml.sax.saxutils import escape

from larder.errors import FormatError
from larder.protocol.names import MAX_SEGMENT_LENGTH

MAX_SEGMENTS: Final = 32
MAX_PATH_LENGTH: Final = 512
_SEGMENT = re.compile(r"[A-Za-z0-9._:!+=@-]+")


def normalise(raw: str) -> tuple[str, bool]:
    """``(path, is_collection)`` for a request path below the sccache root."""
    is_collection = raw == "" or raw.endswith("/")
    segments = [segment for segment in raw.split("/") if segment]
    path = "/".join(segments)
    if len(segments) > MAX_SEGMENTS or len(path) > MAX_PATH_LENGTH:
        raise FormatError(
            f"path too long: at most {MAX_SEGMENTS} segments, {MAX_PATH_LENGTH} chars"
        )
    for segment in segments:
        if segment in (".", "..") or not _SEGMENT.fullmatch(segment):
            raise FormatError(f"invalid path segment {segment[:80]!r}")
        if len(segment) > MAX_SEGMENT_LENGTH:
            raise FormatError(
                f"path segment {segment[:80]!r}... longer than {MAX_SEGMENT_LENGTH} characters"
            )
    return path, is_collection


class Resource(NamedTuple):
    """One ``<D:response>`` of a multistatus answer."""

    href: str
    collection: bool
    size: int = 0
    modified: float = 0.0


def multistatus(resources: Iterable[Resource]) -> bytes:
    """A ``207 Multi-Status`` body listing ``resources``."""
    parts = ['<?xml version="1.0" encoding="utf-8"?>\n<D:multistatus xmlns:D="DAV:">']
    for resource in resources:
        href = escape(quote(resource.href))
        if resource.collection:
            props = "<D:resourcetype><D:collection/></D:resourcetype>"
        else:
            props = (
                f"<D:resourcetype/><D:getcontentlength>{resource.size}</D:getcontentlength>"
                "<D:getcontenttype>application/octet-stream</D:getcontenttype>"
            )
        stamp = formatdate(resource.modified, usegmt=True)
        props += f"<D:getlastmodified>{stamp}</D:getlastmodified>"
        parts.append(
            f"<D:response><D:href>{href}</D:href><D:propstat><D:prop>{props}</D:prop>"
            "<D:status>HTTP/1.1 200 OK</D:status></D:propstat></D:response>"
        )
    parts.append("</D:multistatus>\n")
    return "".join(parts).encode()
