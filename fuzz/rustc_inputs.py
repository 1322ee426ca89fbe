"""Fuzz target: rustc inputs documents (``larder.protocol.inputs``): what a write token uploads,
what the server keeps, what a read token's answers hold, and the comparison the shim makes.

Input layout: byte 0 picks the mode. 0: the rest is an uploaded document. 1: a stored object
(header line and zstd frame). 2: a nearest-keys answer. 3: a miss report. Otherwise: the rest is
``<inputs JSON> NUL <inputs JSON>``, two documents' ``inputs`` as a server could answer them.

Invariant: every parser returns or raises ``FormatError``; a document that parses survives the
stored form unchanged; :func:`differences` and :func:`explain` never raise, whatever the shapes
of the two inputs, and name only categories of ``CATEGORIES``.
"""

from __future__ import annotations

import json

from fuzz.common import instrumented, main

with instrumented():
    from larder.errors import FormatError
    from larder.protocol import inputs


def _object(data: bytes) -> dict[str, object]:
    try:
        loaded = json.loads(data)
    except (ValueError, RecursionError):
        return {}
    return loaded if isinstance(loaded, dict) else {"format": loaded}


def one_input(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0], data[1:]
    try:
        if mode == 0:
            document = inputs.parse_document(rest)
            stored = inputs.pack_stored(document)
            assert inputs.stored_identity(stored) == document.identity.id()
            assert inputs.parse_document(inputs.unpack_stored(stored)) == document
        elif mode == 1:
            inputs.stored_identity(rest)
            inputs.parse_document(inputs.unpack_stored(rest))
        elif mode == 2:
            inputs.parse_nearest(rest)
        elif mode == 3:
            _, category = inputs.parse_report(rest)
            assert category in inputs.CATEGORIES
        else:
            current, _, stored = rest.partition(b"\0")
            found = inputs.explain(_object(current), [("k" * 64, _object(stored))])
            assert found.category in inputs.CATEGORIES
            assert all(d.category in inputs.CATEGORIES for d in found.differences)
            for difference in found.differences:
                difference.render()
    except FormatError:
        pass


if __name__ == "__main__":
    main(one_input)
