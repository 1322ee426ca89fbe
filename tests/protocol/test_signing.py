"""ed25519 keys and signatures against the key pair `nix-store --generate-binary-cache-key` made."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from larder.errors import FormatError
from larder.protocol import narinfo
from larder.protocol.signing import PublicKey, SecretKey, check_key_name

from .conftest import FIXTURES, fixture_id, narinfo_files

SECRET_TEXT = (FIXTURES / "keys" / "secret.key").read_text()
PUBLIC_TEXT = (FIXTURES / "keys" / "public.key").read_text()


def test_real_keys_parse_and_match() -> None:
    secret = SecretKey.parse(SECRET_TEXT)
    public = PublicKey.parse(PUBLIC_TEXT)
    assert secret.name == public.name == "larder-test-1"
    assert secret.public_key() == public
    assert secret.to_string() == SECRET_TEXT.strip()
    assert public.to_string() == PUBLIC_TEXT.strip()
    assert PublicKey.parse(PUBLIC_TEXT + "\n") == public  # trailing newline of a key file


def test_a_key_is_its_name_and_its_bytes() -> None:
    """Nix matches a signature to a trusted key by name first: the same bytes under another
    name are another key, which verifies none of the first one's signatures."""
    public = PublicKey.parse(PUBLIC_TEXT)
    renamed = PublicKey.parse("larder-test-2:" + PUBLIC_TEXT.strip().partition(":")[2])
    assert renamed != public and len({renamed, public}) == 2
    sig = SecretKey.parse(SECRET_TEXT).sign("hello")
    assert public.verify("hello", sig) and not renamed.verify("hello", sig)


@pytest.mark.parametrize("path", narinfo_files(), ids=fixture_id)
def test_nix_signatures_verify_and_are_reproduced(path: Path) -> None:
    info = narinfo.parse(path.read_bytes())
    public = PublicKey.parse(PUBLIC_TEXT)
    secret = SecretKey.parse(SECRET_TEXT)
    message = narinfo.fingerprint(info)
    assert len(info.sigs) == 1
    assert public.verify(message, info.sigs[0])
    assert public.verify(message.encode(), info.sigs[0])
    # ed25519 is deterministic: signing the fingerprint again gives exactly what Nix wrote.
    assert secret.sign(message) == info.sigs[0]


def test_generate_sign_verify() -> None:
    key = SecretKey.generate("cache.example-1")
    public = key.public_key()
    sig = key.sign("hello")
    assert sig.startswith("cache.example-1:")
    assert public.verify("hello", sig)
    assert not public.verify("hello!", sig)
    assert SecretKey.parse(key.to_string()).sign("hello") == sig
    assert PublicKey.parse(public.to_string()) == public
    other = SecretKey.generate("cache.example-1")
    assert not public.verify("hello", other.sign("hello"))
    assert repr(key) == "SecretKey(name='cache.example-1', <secret>)"


def test_verify_returns_false_for_foreign_or_malformed_signatures() -> None:
    public = PublicKey.parse(PUBLIC_TEXT)
    good = SecretKey.parse(SECRET_TEXT).sign("m")
    raw = good.split(":", 1)[1]
    assert public.verify("m", good)
    for bad in (
        "",
        "no-colon",
        "other-name:" + raw,
        "larder-test-1:",
        "larder-test-1:!!!!",
        "larder-test-1:" + base64.b64encode(bytes(63)).decode(),
        "larder-test-1:" + base64.b64encode(bytes(65)).decode(),
        "larder-test-1:" + base64.b64encode(bytes(64)).decode(),
        "larder-test-1:" + raw[:-4],
        "larder-test-1:" + raw + " ",
        "larder-test-1:caf\u00e9",
    ):
        assert not public.verify("m", bad), bad


def _b64(n: int) -> str:
    return base64.b64encode(bytes(range(n))).decode()


SEED_AND_PUBLIC = base64.b64decode(SECRET_TEXT.strip().split(":", 1)[1])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "must be <name>:<base64>"),
        ("no-colon-here", "must be <name>:<base64>"),
        (":" + _b64(64), "invalid key name ''"),
        ("bad name:" + _b64(64), "invalid key name 'bad name'"),
        ("name:!!!", "invalid base64"),
        ("name:" + _b64(32), "expected 64 bytes, got 32"),
        ("name:" + _b64(65), "expected 64 bytes, got 65"),
        (
            "name:" + base64.b64encode(SEED_AND_PUBLIC[:32] + bytes(32)).decode(),
            "its public half does not match its seed",
        ),
    ],
)
def test_malformed_secret_keys(text: str, message: str) -> None:
    with pytest.raises(FormatError, match=re.escape(message)):
        SecretKey.parse(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "must be <name>:<base64>"),
        ("name", "must be <name>:<base64>"),
        (":" + _b64(32), "invalid key name"),
        ("name:" + _b64(31), "expected 32 bytes, got 31"),
        ("name:" + _b64(33), "expected 32 bytes, got 33"),
        ("name:" + _b64(64), "expected 32 bytes, got 64"),
        ("name:" + _b64(32)[:-1] + "!", "invalid base64"),
    ],
)
def test_malformed_public_keys(text: str, message: str) -> None:
    with pytest.raises(FormatError, match=re.escape(message)):
        PublicKey.parse(text)


def test_key_names() -> None:
    for good in ("a", "cache.example.org-1", "main.larder-abc123", "ü"):
        assert check_key_name(good) == good
    for bad in ("", "a:b", "a b", "a\tb", "a\n"):
        with pytest.raises(FormatError, match="invalid key name"):
            check_key_name(bad)
