"""nix32: golden vectors from `nix hash to-base32`, a bit-by-bit port of Nix's loop, malformed."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from larder.errors import FormatError
from larder.protocol import nix32

from .conftest import narinfo_files, nix32_vectors


def nix_reference_encode(data: bytes) -> str:
    """Nix's printHash32 written out as in hash.cc, to check the integer-based encoder against."""
    length = (len(data) * 8 - 1) // 5 + 1 if data else 0
    out = []
    for n in range(length - 1, -1, -1):
        b = n * 5
        i, j = divmod(b, 8)
        c = (data[i] >> j) | (0 if i >= len(data) - 1 else data[i + 1] << (8 - j))
        out.append(nix32.ALPHABET[c & 0x1F])
    return "".join(out)


@pytest.mark.parametrize("vector", nix32_vectors(), ids=lambda v: f"{v['algo']}-{v['hex'][:8]}")
def test_golden_vectors(vector: dict[str, str]) -> None:
    digest = bytes.fromhex(vector["hex"])
    assert nix32.encode(digest) == vector["nix32"]
    assert nix32.decode(vector["nix32"]) == digest
    assert len(vector["nix32"]) == nix32.encoded_length(len(digest))


def test_store_path_hashes_from_real_narinfos() -> None:
    hashes = {path.name.removesuffix(".narinfo") for path in narinfo_files()}
    assert hashes
    for h in hashes:
        raw = nix32.decode(h)
        assert len(raw) == 20
        assert nix32.encode(raw) == h


@pytest.mark.parametrize(
    ("nbytes", "chars"), [(0, 0), (1, 2), (16, 26), (20, 32), (32, 52), (64, 103)]
)
def test_encoded_length(nbytes: int, chars: int) -> None:
    assert nix32.encoded_length(nbytes) == chars


def test_empty() -> None:
    assert nix32.encode(b"") == ""
    assert nix32.decode("") == b""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("e" + "0" * 51, "invalid character 'e'"),
        ("o" + "0" * 51, "invalid character 'o'"),
        ("u" + "0" * 51, "invalid character 'u'"),
        ("t" + "0" * 51, "invalid character 't'"),
        ("A" + "0" * 51, "invalid character 'A'"),
        (" " + "0" * 51, "invalid character ' '"),
        ("+" + "0" * 51, "invalid character '+'"),  # int() would accept a sign
        ("0_" + "0" * 50, "invalid character '_'"),  # ... and underscores
        ("٣" + "0" * 51, "invalid character"),  # ... and non-ASCII digits
        ("0" * 51, "invalid nix32 length 51"),
        ("0" * 54, "invalid nix32 length 54"),
        ("0" * 3, "invalid nix32 length 3"),
        ("0", "invalid nix32 length 1"),
        ("2" + "0" * 51, "non-zero bits beyond 32 bytes"),
        ("z" * 52, "non-zero bits beyond 32 bytes"),
        ("8" + "0" * 25, "non-zero bits beyond 16 bytes"),
    ],
)
def test_malformed(text: str, message: str) -> None:
    with pytest.raises(FormatError, match=re.escape(message)):
        nix32.decode(text)


def test_largest_valid_first_digit() -> None:
    assert nix32.decode("1" + "z" * 51) == b"\xff" * 32
    assert nix32.encode(b"\xff" * 20) == "z" * 32


@given(st.binary(max_size=200))
def test_round_trip(data: bytes) -> None:
    encoded = nix32.encode(data)
    assert encoded == nix_reference_encode(data)
    assert len(encoded) == nix32.encoded_length(len(data))
    assert nix32.decode(encoded) == data


@given(st.text(alphabet=nix32.ALPHABET + "eotuE_+ ", max_size=60))
def test_decode_never_crashes(text: str) -> None:
    try:
        data = nix32.decode(text)
    except FormatError:
        return
    assert nix32.encode(data) == text
