"""WebDAV paths and multistatus bodies."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from larder.errors import FormatError
from larder.protocol.dav import MAX_SEGMENTS, Resource, multistatus, normalise


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", ("", True)),
        ("/", ("", True)),
        ("a//b/", ("a/b", True)),
        ("/a/b/c/" + "f" * 64, ("a/b/c/" + "f" * 64, False)),
        (".sccache_check", (".sccache_check", False)),
        ("//a" + "/" * 600 + "b", ("a/b", False)),  # the limit applies once collapsed
        ("x" * 255 + "/" + "y" * 255, ("x" * 255 + "/" + "y" * 255, False)),
    ],
)
def test_normalise(raw: str, expected: tuple[str, bool]) -> None:
    assert normalise(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "..",
        "a/../b",
        "a/./b",
        "a\\b",
        "a\x00b",
        "a b",
        "a~b",
        "x/" * (MAX_SEGMENTS + 1),
        "/".join(["x" * 200] * 3),  # longer than MAX_PATH_LENGTH in all
        "a/" + "x" * 256,  # a segment longer than a file name may be
    ],
)
def test_normalise_refuses(raw: str) -> None:
    with pytest.raises(FormatError):
        normalise(raw)


def test_multistatus_is_well_formed_and_escaped() -> None:
    body = multistatus([Resource("/c/sccache/a b&c/", True), Resource("/c/x", False, 7, 0.0)])
    root = ET.fromstring(body)
    hrefs = [e.text for e in root.iter("{DAV:}href")]
    assert hrefs == ["/c/sccache/a%20b%26c/", "/c/x"]
    assert root.find(".//{DAV:}collection") is not None
    assert [e.text for e in root.iter("{DAV:}getcontentlength")] == ["7"]
    assert len(list(root.iter("{DAV:}getlastmodified"))) == 2
