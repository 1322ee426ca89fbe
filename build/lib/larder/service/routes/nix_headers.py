"""The headers of the Nix answers, defined once for the routes (:mod:`.nix`) and the short path
(:mod:`larder.service.front.short_path`), which writes them as aiohttp does (:func:`head_lines`).

A change to what a narinfo, ``nix-cache-info`` or NAR answer carries is made here, and both
readers send it; ``tests/service/test_fastpath*.py`` compare their answers byte for byte.
"""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus

NARINFO_TYPE = "text/x-nix-narinfo"
NAR_TYPE = "application/x-nix-nar"
CACHE_INFO_TYPE = "text/x-nix-cache-info"


def narinfo_headers() -> dict[str, str]:
    """A narinfo answer's headers (GET and HEAD)."""
    return {"Content-Type": NARINFO_TYPE}


def cache_info_headers() -> dict[str, str]:
    """``nix-cache-info``'s headers."""
    return {"Content-Type": CACHE_INFO_TYPE}


def nar_headers() -> dict[str, str]:
    """A NAR answer's own headers (a file response adds ``Accept-Ranges`` and its validators)."""
    return {"Content-Type": NAR_TYPE}


def head_lines(status: int, headers: Mapping[str, str], length: int | None) -> bytes:
    """The status line, ``headers`` and ``Content-Length`` (unless ``None``), as aiohttp writes
    them before ``Date`` and ``Server``."""
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in headers.items()]
    if length is not None:
        lines.append(f"Content-Length: {length}\r\n")
    return "".join(lines).encode("latin-1")
