"""Validated names from URLs: cache names and the paths of opaque Nix objects.

Spec: larder's own rules, chosen so a validated value is safe as a URL segment, a storage key
and a file name on disk:

* a cache name matches ``[a-z0-9][a-z0-9_-]{0,62}`` and is not one of :data:`RESERVED_NAMES`
  (first path segments the service routes itself);
* an object path names a file Nix uploads next to narinfos and reads back verbatim
  (``<hash>.ls``, ``log/<drv base name>``, ``realisations/sha256:<nix32>!out.doi``,
  ``build-trace-v2/...``, ``debuginfo/<hex>``): 1 to 8 ``/``-separated segments of
  ``[A-Za-z0-9._:!+=@?-]``, none empty, ``.`` or ``..`` or longer than 255 characters (a file
  name on disk), at most 512 characters, no leading ``/``. (``?`` is allowed because store
  path names, hence derivation log names, may contain it.) Names the cache's own routes answer
  are not objects (:data:`ROUTED_PREFIXES`, ``nix-cache-info``, ``*.narinfo``, a last segment
  ``.sccache_check``, :data:`SCCACHE_PROBE`): a write there
  (``nar%2F<hash>.nar.xz``, ``rustc/manifest/<key>`` for ``rustc/manifests/``) would skip that
  route's checks or be stored where no client reads it.
"""

from __future__ import annotations

import re
from typing import Final

from larder.errors import FormatError

RESERVED_NAMES: Final = frozenset({"api", "healthz", "readyz", "metrics", "static"})
#: First segments of a cache's URLs that its own routes answer (NARs, the rustc API, sccache).
ROUTED_PREFIXES: Final = frozenset({"nar", "rustc", "sccache"})
MAX_OBJECT_PATH_LENGTH: Final = 512
MAX_OBJECT_PATH_SEGMENTS: Final = 8
#: A file name's limit on common file systems (NAME_MAX): every segment is one on disk storage.
MAX_SEGMENT_LENGTH: Final = 255

_CACHE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_SEGMENT = re.compile(r"[A-Za-z0-9._:!+=@?-]+")


def check_cache_name(name: str) -> str:
    """Return ``name`` if it is a valid cache name, else raise :class:`FormatError`."""
    if not _CACHE_NAME.fullmatch(name):
        raise FormatError(
            f"invalid cache name {name[:80]!r}: use 1-63 of a-z, 0-9, '_' and '-', "
            "starting with a letter or digit"
        )
    if name in RESERVED_NAMES:
        raise FormatError(f"invalid cache name {name!r}: it is reserved")
    return name


#: The name sccache's start-up probe reads and writes, answered by the WebDAV routes wherever
#: it is asked for (an endpoint missing ``sccache/``): no object of another protocol has it.
SCCACHE_PROBE = ".sccache_check"


def check_object_path(path: str) -> str:
    """Return ``path`` if it is a valid opaque object path, else raise :class:`FormatError`."""
    shown = repr(path[:80] + ("..." if len(path) > 80 else ""))
    if not path:
        raise FormatError("invalid object path: it is empty")
    if len(path) > MAX_OBJECT_PATH_LENGTH:
        raise FormatError(
            f"invalid object path {shown}: longer than {MAX_OBJECT_PATH_LENGTH} characters"
        )
    if path.startswith("/"):
        raise FormatError(f"invalid object path {shown}: it must be relative")
    segments = path.split("/")
    if (
        (len(segments) > 1 and segments[0] in ROUTED_PREFIXES)
        or (len(segments) == 1 and (path == "nix-cache-info" or path.endswith(".narinfo")))
        or segments[-1] == SCCACHE_PROBE
    ):
        raise FormatError(f"invalid object path {shown}: the cache's own routes answer it")
    if len(segments) > MAX_OBJECT_PATH_SEGMENTS:
        raise FormatError(
            f"invalid object path {shown}: more than {MAX_OBJECT_PATH_SEGMENTS} segments"
        )
    for segment in segments:
        if segment in ("", ".", ".."):
            raise FormatError(f"invalid object path {shown}: empty, '.' or '..' segment")
        if len(segment) > MAX_SEGMENT_LENGTH:
            raise FormatError(
                f"invalid object path {shown}: a segment longer than {MAX_SEGMENT_LENGTH} "
                "characters"
            )
        if not _SEGMENT.fullmatch(segment):
            bad = next(c for c in segment if not _SEGMENT.fullmatch(c))
            raise FormatError(f"invalid object path {shown}: invalid character {bad!r}")
    return path
