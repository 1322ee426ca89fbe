"""Nix's base-32 encoding of digests ("nix32").

Spec: Nix ``src/libutil/hash.cc`` (``printHash32`` / ``Hash`` parsing of base-32). The alphabet is
``0123456789abcdfghijklmnpqrsvwxyz`` (no ``e``, ``o``, ``t``, ``u``). The digest bytes are read as
one little-endian integer and written as base-32 digits, most significant first, so
``n`` bytes become ``ceil(8n / 5)`` characters (20 -> 32, 32 -> 52, 64 -> 103). Bits above
``8n`` in the first character must be zero.
"""

from __future__ import annotations

import re

from larder.errors import FormatError

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"

_VALID = re.compile(f"[{ALPHABET}]*")
# Translate nix32 digits to the digits Python's int(x, 32) understands (0-9a-v).
_TO_STD = str.maketrans(ALPHABET, "0123456789abcdefghijklmnopqrstuv")


def _show(s: str) -> str:
    return repr(s) if len(s) <= 80 else repr(s[:77] + "...")


def encoded_length(nbytes: int) -> int:
    """The number of nix32 characters for ``nbytes`` bytes."""
    if nbytes < 0:
        raise ValueError("byte count must be non-negative")
    return (nbytes * 8 + 4) // 5


def encode(data: bytes) -> str:
    """Encode ``data`` in nix32."""
    value = int.from_bytes(data, "little")
    return "".join(
        ALPHABET[(value >> (5 * n)) & 31] for n in range(encoded_length(len(data)) - 1, -1, -1)
    )


def decode(s: str) -> bytes:
    """Decode a nix32 string; raise :class:`FormatError` on a bad character, length or tail."""
    if not _VALID.fullmatch(s):
        bad = next(c for c in s if c not in ALPHABET)
        raise FormatError(f"invalid character {bad!r} in nix32 string {_show(s)}")
    nbytes = len(s) * 5 // 8
    if encoded_length(nbytes) != len(s):
        raise FormatError(f"invalid nix32 length {len(s)} (string {_show(s)})")
    value = int(s.translate(_TO_STD), 32) if s else 0
    if value >> (8 * nbytes):
        raise FormatError(f"nix32 string {_show(s)} has non-zero bits beyond {nbytes} bytes")
    return value.to_bytes(nbytes, "little")
