"""Documents clients send (manifests, inputs, queries) are RFC 8259 JSON in UTF-8 or refused."""

from __future__ import annotations

import json

import pytest

from larder.errors import FormatError
from larder.protocol.inputs import InputsDocument, parse_document
from larder.protocol.rustc import load_json
from tests.protocol.test_inputs import IDENTITY, inputs


@pytest.mark.parametrize(
    "data",
    [
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a": -Infinity}',
        b'{"version": 2, "version": 1}',
        b'{"a": {"b": 1, "b": 1}}',
        b'{"stdout": "\\ud800"}',
        b'["\\udfff x"]',
        b"\xef\xbb\xbf{}",  # a UTF-8 BOM
        '{"a": 1}'.encode("utf-16"),
        b'{"a": "\xff"}',
        b"[" * 5000 + b"]" * 5000,
    ],
    ids=["nan", "inf", "-inf", "dup", "dup-nested", "surrogate", "surrogate-list", "bom",
         "utf16", "latin1", "deep"],
)  # fmt: skip
def test_documents_that_are_not_json_are_refused(data: bytes) -> None:
    with pytest.raises(FormatError, match="not JSON"):
        load_json(data, "document")


def test_escapes_that_make_whole_characters_are_read() -> None:
    assert load_json(b'{"s": "\\ud83e\\udd80 \\u00e9", "n": 1.5}', "document") == {
        "s": "\U0001f980 \u00e9",
        "n": 1.5,
    }


@pytest.mark.parametrize("version", [True, 1.0, "1"])
def test_an_inputs_version_must_be_the_integer(version: object) -> None:
    document = json.loads(InputsDocument(IDENTITY, inputs()).to_json())
    assert parse_document(json.dumps(document).encode()).identity == IDENTITY
    document["version"] = version
    with pytest.raises(FormatError, match="version"):
        parse_document(json.dumps(document).encode())
