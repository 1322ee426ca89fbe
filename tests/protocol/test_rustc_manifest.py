"""Manifests whose printed text is too large for version 1 are version 2 (``printed_zst``):
compressed, read back whole by clients, checked for shape by the server, bounded when decoded."""

from __future__ import annotations

import base64
import json

import pytest
import zstandard

from larder.errors import FormatError
from larder.protocol.rustc import (
    MAX_MANIFEST_SIZE,
    MAX_PRINTED,
    Manifest,
    Output,
    parse_manifest,
)

OUTPUTS = (Output("libt-x.rlib", "ab" * 32, 10),)


def warnings(count: int) -> str:
    return "".join(
        json.dumps({"$message_type": "diagnostic", "message": f"unused variable: `v_{i}`",
                    "rendered": f"\x1b[33mwarning\x1b[0m: unused `v_{i}`\n --> src/lib.rs"})
        + "\n"
        for i in range(count)
    )  # fmt: skip


def test_what_fits_stays_version_1_as_older_readers_read_it() -> None:
    manifest = Manifest.made("t", OUTPUTS, "out", warnings(10))
    assert manifest.version == 1 and manifest.printed() == ("out", warnings(10))
    assert parse_manifest(manifest.to_json()) == manifest


def test_printed_text_past_the_limit_is_kept_compressed_and_read_back_whole() -> None:
    stderr = warnings(20_000)
    assert len(Manifest("t", OUTPUTS, "", stderr).to_json()) > 3 * MAX_MANIFEST_SIZE
    manifest = Manifest.made("t", OUTPUTS, "stdout line\n", stderr)
    document = manifest.to_json()
    assert manifest.version == 2 and len(document) <= MAX_MANIFEST_SIZE
    assert "stderr" not in json.loads(document)
    parsed = parse_manifest(document)
    assert parsed.to_json() == document  # the server stores it as sent
    assert parsed.printed() == ("stdout line\n", stderr)


def test_printed_text_no_reader_would_take_is_not_packed() -> None:
    stderr = "w" * (MAX_PRINTED + 1)  # compresses to almost nothing, decodes past the bound
    manifest = Manifest.made("t", OUTPUTS, "", stderr)
    assert manifest.version == 1 and len(manifest.to_json()) > MAX_MANIFEST_SIZE  # too large


def packed_document(printed_zst: str) -> bytes:
    outputs = [{"name": "libt-x.rlib", "blake3": "ab" * 32, "size": 10, "mode": 420}]
    document = {"version": 2, "crate": "t", "outputs": outputs, "printed_zst": printed_zst,
                "exit_code": 0}  # fmt: skip
    return json.dumps(document).encode()


@pytest.mark.parametrize(
    "printed_zst,message",
    [
        ("not base64!", "base64"),
        (base64.b64encode(b"plain text, no frame").decode(), "zstd frame"),
    ],
)
def test_the_server_refuses_a_version_2_manifest_of_another_shape(
    printed_zst: str, message: str
) -> None:
    with pytest.raises(FormatError, match=message):
        parse_manifest(packed_document(printed_zst))


def pack(data: bytes) -> str:
    return base64.b64encode(zstandard.ZstdCompressor().compress(data)).decode()


@pytest.mark.parametrize(
    "printed_zst,message",
    [
        (pack(b" " * (MAX_PRINTED + 1)), "more than"),  # a bomb: 64 KiB that decodes to 64 MiB
        (pack(b'{"stdout": ""}'), r"\[stdout, stderr\]"),
        (pack(b'["only one"]'), r"\[stdout, stderr\]"),
        (pack(b"[1, 2]"), r"\[stdout, stderr\]"),
        (pack(b"\xff\xfe"), "not JSON"),
        # a frame cut short: what it gives is no whole array
        (base64.b64encode(b"\x28\xb5\x2f\xfd" + b"\x00" * 20).decode(), "not JSON"),
        (base64.b64encode(b"\x28\xb5\x2f\xfd\xff" + b"\x00" * 20).decode(), "does not decode"),
    ],
)
def test_a_client_refuses_printed_text_that_is_bounded_or_shaped_otherwise(
    printed_zst: str, message: str
) -> None:
    manifest = parse_manifest(packed_document(printed_zst))
    with pytest.raises(FormatError, match=message):
        manifest.printed()


def test_a_version_it_does_not_know_is_refused() -> None:
    document = json.loads(packed_document(pack(b'["", ""]')))
    document["version"] = 3
    with pytest.raises(FormatError, match="unsupported manifest version 3"):
        parse_manifest(json.dumps(document).encode())
