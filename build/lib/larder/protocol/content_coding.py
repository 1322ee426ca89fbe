"""HTTP content codings (RFC 9110, sections 8.4 and 12.5.3) of the bodies Nix sends and reads.

Nix 2.34 compresses ``.narinfo``, ``.ls`` and ``log/`` uploads when asked to
(``narinfo-compression``, ``ls-compression``, ``log-compression``) and names the coding in
``Content-Encoding``: ``gzip``, ``xz``, ``bzip2``, ``br`` or ``zstd`` (``xz`` and ``bzip2`` are
Nix's own names, not registered HTTP codings). Its downloads go through curl, which sends
``Accept-Encoding: deflate, gzip, br, zstd`` and decodes only those.

:func:`body_coding` maps a ``Content-Encoding`` header to the name of the
:class:`~larder.protocol.compression.Decompressor` that undoes it (``none`` for no coding); one
coding at most, ``identity`` entries aside. :func:`accepts` reads ``Accept-Encoding``.
"""

from __future__ import annotations

from typing import Final

from larder.errors import UnsupportedEncoding

#: Content-Encoding token (lower case) -> decoder name.
CODINGS: Final[dict[str, str]] = {
    "identity": "none",
    "gzip": "gzip",
    "x-gzip": "gzip",
    "deflate": "deflate",
    "br": "br",
    "zstd": "zstd",
    "xz": "xz",
    "bzip2": "bzip2",
    "x-bzip2": "bzip2",
}


def body_coding(header: str | None) -> str:
    """The decoder name for a body sent with ``Content-Encoding: header``.

    Raises :class:`UnsupportedEncoding` for an unknown coding or for more than one coding (a
    body compressed twice).
    """
    if not header:
        return "none"
    names = [token.strip().lower() for token in header.split(",")]
    real = [name for name in names if name and name != "identity"]
    unknown = [name for name in real if name not in CODINGS]
    if unknown:
        shown = unknown[0][:40]
        raise UnsupportedEncoding(
            f"unsupported Content-Encoding {shown!r}; supported: {', '.join(CODINGS)}"
        )
    if len(real) > 1:
        raise UnsupportedEncoding("a body with more than one Content-Encoding is not accepted")
    return CODINGS[real[0]] if real else "none"


def _weights(header: str) -> dict[str, float]:
    weights: dict[str, float] = {}
    for item in header.split(","):
        name, _, params = item.partition(";")
        name = name.strip().lower()
        if not name:
            continue
        weight = 1.0
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    weight = float(value.strip())
                except ValueError:
                    weight = 0.0
        weights[name] = weight
    return weights


def accepts(header: str | None, coding: str) -> bool:
    """Whether a request with ``Accept-Encoding: header`` takes a response in ``coding`` (an
    HTTP token such as ``zstd``). No header is read as "identity only", the safe choice for a
    body that is also available uncoded."""
    if not header:
        return False
    weights = _weights(header)
    weight = weights.get(coding.lower(), weights.get("*", 0.0))
    return weight > 0
