"""Nix hash strings: every encoding Nix accepts, against vectors from `nix hash`."""

from __future__ import annotations

import base64
import contextlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from larder.errors import FormatError
from larder.protocol.hashes import HASH_SIZES, NixHash, parse_hash, sha256_nix

from .conftest import nix32_vectors


@pytest.mark.parametrize("vector", nix32_vectors(), ids=lambda v: f"{v['algo']}-{v['hex'][:8]}")
def test_all_encodings_of_golden_vectors(vector: dict[str, str]) -> None:
    algo, digest = vector["algo"], bytes.fromhex(vector["hex"])
    expected = NixHash(algo, digest)
    b64 = base64.b64encode(digest).decode()
    for text in (
        f"{algo}:{vector['nix32']}",
        f"{algo}:{vector['hex']}",
        f"{algo}:{vector['hex'].upper()}",
        f"{algo}:{b64}",
        vector["sri"],
    ):
        assert parse_hash(text) == expected, text
        assert parse_hash(text, algo) == expected, text
    for bare in (vector["nix32"], vector["hex"], b64):
        assert parse_hash(bare, algo) == expected
    assert expected.sri() == vector["sri"]
    assert expected.to_nix() == f"{algo}:{vector['nix32']}"
    assert expected.nix32() == vector["nix32"]
    assert expected.hex() == vector["hex"]


def test_sha256_nix() -> None:
    digest = bytes(range(32))
    assert sha256_nix(digest) == "sha256:" + NixHash("sha256", digest).nix32()


SHA256_NIX32 = "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"


@pytest.mark.parametrize(
    ("text", "algo", "message"),
    [
        ("", None, "has no algorithm"),
        (SHA256_NIX32, None, "has no algorithm"),
        ("sha3:" + SHA256_NIX32, None, "unsupported algorithm 'sha3'"),
        ("SHA256:" + SHA256_NIX32, None, "unsupported algorithm 'SHA256'"),
        ("sha256:" + SHA256_NIX32[:-1], None, "not 51"),
        ("sha256:" + SHA256_NIX32 + "0", None, "not 53"),
        ("sha256:" + "g" * 64, None, "invalid base-16"),
        ("sha256:" + "e" * 52, None, "invalid character 'e'"),
        ("sha256:" + "!" * 44, None, "invalid base64"),
        ("sha256:" + "A" * 43 + "B", None, "base64 digest is not 32 bytes"),  # unpadded: 33 B
        ("sha256:" + "A" * 42 + "B=", None, "non-canonical base64"),
        ("sha256-" + "0" * 64, None, "in base64 has 44 characters"),
        ("sha1:" + SHA256_NIX32, None, "a sha1 digest has"),
        ("sha256:" + SHA256_NIX32, "sha512", "expected a sha512 hash, got sha256"),
        ("0" * 64, "sha512", "a sha512 digest has"),
        ("0" * 64, "blake3", "unsupported algorithm 'blake3'"),
        ("sha256:" + " " + SHA256_NIX32[1:], None, "invalid character ' '"),
    ],
)
def test_malformed(text: str, algo: str | None, message: str) -> None:
    with pytest.raises(FormatError, match=re.escape(message)):
        parse_hash(text, algo)


def test_bad_digest_length() -> None:
    with pytest.raises(FormatError, match="a sha256 digest has 32 bytes, not 31"):
        NixHash("sha256", bytes(31))
    with pytest.raises(FormatError, match="unsupported hash algorithm"):
        NixHash("crc32", bytes(4))


@given(st.sampled_from(sorted(HASH_SIZES)), st.data())
def test_round_trip(algo: str, data: st.DataObject) -> None:
    digest = data.draw(st.binary(min_size=HASH_SIZES[algo], max_size=HASH_SIZES[algo]))
    value = NixHash(algo, digest)
    for text in (value.to_nix(), value.sri(), f"{algo}:{value.hex()}"):
        assert parse_hash(text) == value


@given(st.text(max_size=120))
def test_parse_never_crashes(text: str) -> None:
    with contextlib.suppress(FormatError):
        parse_hash(text)
