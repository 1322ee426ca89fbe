"""Any input to the rustc and WebDAV wire formats ends as a value or a FormatError."""

from __future__ import annotations

import contextlib
import json

from hypothesis import given
from hypothesis import strategies as st

from larder.errors import FormatError
from larder.protocol.dav import Resource, multistatus, normalise
from larder.protocol.rustc import (
    Manifest,
    Output,
    parse_blob_query,
    parse_direct_entries,
    parse_direct_entry,
    parse_manifest,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=4),
    max_leaves=20,
)  # fmt: skip
keys = ("version", "crate", "outputs", "stdout", "stderr", "exit_code", "sources", "env", "blobs",
        "entries", "name", "blake3", "size", "mode")  # fmt: skip
documents = st.dictionaries(st.sampled_from(keys), json_values, max_size=8)


@given(st.one_of(st.binary(max_size=300), documents.map(lambda d: json.dumps(d).encode())))
def test_rustc_parsers_never_crash(data: bytes) -> None:
    for parser in (parse_manifest, parse_blob_query, parse_direct_entry, parse_direct_entries):
        with contextlib.suppress(FormatError):
            parser(data)


names = st.from_regex(r"[A-Za-z0-9._+-]{1,40}", fullmatch=True).filter(
    lambda n: n not in (".", "..")
)


@given(
    st.lists(
        st.tuples(names, st.from_regex(r"[0-9a-f]{64}", fullmatch=True), st.integers(0, 2**40),
                  st.integers(0, 0o777)),
        min_size=1, max_size=5, unique_by=lambda t: t[0],
    ),
    st.text(max_size=50),
)  # fmt: skip
def test_manifest_round_trip(outputs: list[tuple[str, str, int, int]], stderr: str) -> None:
    manifest = Manifest("crate_x", tuple(Output(*o) for o in outputs), "", stderr)
    parsed = parse_manifest(manifest.to_json())
    assert sorted(parsed.outputs) == sorted(manifest.outputs)
    assert parsed.stderr == stderr


@given(st.text(max_size=200))
def test_dav_paths_are_normalised_or_refused(raw: str) -> None:
    try:
        path, _ = normalise(raw)
    except FormatError:
        return
    segments = path.split("/") if path else []
    assert all(s and s not in (".", "..") and "\\" not in s and "\x00" not in s for s in segments)
    assert not path.startswith("/") and "//" not in path


@given(st.lists(st.tuples(st.text(max_size=30), st.booleans(), st.integers(0, 10**12)),
                max_size=5))  # fmt: skip
def test_multistatus_is_always_well_formed(items: list[tuple[str, bool, int]]) -> None:
    import xml.etree.ElementTree as ET

    body = multistatus(Resource(href, coll, size) for href, coll, size in items)
    root = ET.fromstring(body)
    assert len(root.findall("{DAV:}response")) == len(items)
