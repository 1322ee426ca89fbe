"""Fuzz target: the narinfo parser (``larder.protocol.narinfo``), the gate for PUT bodies.

Invariant: ``parse`` of any bytes (and of the same input as text) returns a ``NarInfo`` or
raises ``FormatError``; a parsed narinfo renders to text that parses back to the same value, and
its fingerprint is computable. Anything else is a crash.
"""

from __future__ import annotations

from fuzz.common import instrumented, main, text

with instrumented():
    from larder.errors import FormatError
    from larder.protocol import narinfo


def one_input(data: bytes) -> None:
    try:
        info = narinfo.parse(data)
    except FormatError:
        info = None
    try:
        from_text = narinfo.parse(text(data))
    except FormatError:
        from_text = None
    assert from_text == info, "bytes and text parses disagree"
    if info is None:
        return
    rendered = narinfo.render(info)
    assert narinfo.parse(rendered) == info, f"render does not parse back: {rendered!r}"
    narinfo.fingerprint(info)


if __name__ == "__main__":
    main(one_input)
