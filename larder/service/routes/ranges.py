"""The one byte range a ``GET`` of a stored blob is answered with (RFC 9110 §14).

A ``Range`` of unit ``bytes`` (any case) with a single range, ``first-last``, ``first-`` or the
suffix ``-length``, is served as 206; a ``first`` at or past the end, or a suffix of length 0 (or
any range of an empty body), is unsatisfiable: 416. Everything else is ignored and the whole body
sent, as §14.2 allows: another unit, a field that is not the grammar (``bytes= 0 - 5``,
``bytes=5-1``, ``bytes=0x10-``), and more than one range (the answer would be multipart, which no
client of a cache asks for). A ``last`` past the end is read as the end.
"""

from __future__ import annotations

import re

#: ``first-[last]`` or ``-suffix``; digits only (``\\d`` would take other scripts' digits too).
_SPEC = re.compile(r"([0-9]+)-([0-9]*)|-([0-9]+)")
#: Numbers longer than this are read as this many nines: past any body's end, never an
#: ``int()`` of thousands of digits.
_MAX_DIGITS = 19


class Unsatisfiable(Exception):
    """The range is well formed and begins past the end of the body (answer 416)."""


def _number(digits: str) -> int:
    return int(digits) if len(digits) <= _MAX_DIGITS else 10**_MAX_DIGITS - 1


def byte_range(value: str, size: int) -> tuple[int, int] | None:
    """``(start, stop)`` of the range ``value`` asks of a ``size``-byte body, ``None`` for the
    whole body; raises :class:`Unsatisfiable` (module docstring)."""
    unit, equals, ranges = value.partition("=")
    if not equals or unit.strip(" \t").lower() != "bytes":
        return None
    specs = [spec for spec in (part.strip(" \t") for part in ranges.split(",")) if spec]
    if len(specs) != 1:
        return None
    match = _SPEC.fullmatch(specs[0])
    if match is None:
        return None
    first, last, suffix = match.groups()
    if suffix is not None:
        length = _number(suffix)
        if length == 0 or size == 0:
            raise Unsatisfiable
        return max(size - length, 0), size
    start = _number(first)
    if last and _number(last) < start:
        return None
    if start >= size:
        raise Unsatisfiable
    return start, size if not last else min(_number(last) + 1, size)
