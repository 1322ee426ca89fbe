"""Nix binary-cache signing keys and signatures (ed25519).

Spec: Nix ``src/libstore/crypto.cc`` (``SecretKey``, ``PublicKey``, ``verifyDetached``) and the
key files ``nix-store --generate-binary-cache-key`` writes:

* secret key: ``<name>:<base64 of 64 bytes>``, the libsodium layout ``seed (32) || public (32)``;
* public key: ``<name>:<base64 of 32 bytes>``;
* signature:  ``<name>:<base64 of 64 bytes>``, the detached ed25519 signature of a message (for
  narinfos, :func:`larder.protocol.narinfo.fingerprint`).

A key name is non-empty and contains neither ``:`` nor whitespace. Surrounding whitespace (the
trailing newline of a key file) is ignored when parsing keys. ed25519 is deterministic, so
signing the same message with the same key always yields the same signature Nix would write.
"""

from __future__ import annotations

import base64
import binascii
import re

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from larder.errors import FormatError

KEY_NAME = re.compile(r"[^\s:]+")


def check_key_name(name: str) -> str:
    """Return ``name`` if it is a valid key name (non-empty, no ``:``, no whitespace)."""
    if not KEY_NAME.fullmatch(name):
        raise FormatError(
            f"invalid key name {name[:80]!r}: must be non-empty, without ':' or spaces"
        )
    return name


def _split(text: str, what: str, size: int) -> tuple[str, bytes]:
    name, colon, encoded = text.strip().partition(":")
    if not colon:
        raise FormatError(f"{what} must be <name>:<base64>, got no ':'")
    check_key_name(name)
    try:
        raw = base64.b64decode(encoded.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise FormatError(f"{what} {name!r}: invalid base64") from None
    if len(raw) != size:
        raise FormatError(f"{what} {name!r}: expected {size} bytes, got {len(raw)}")
    return name, raw


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


class PublicKey:
    """A named ed25519 public key that verifies Nix signatures."""

    __slots__ = ("_key", "_raw", "name")

    def __init__(self, name: str, raw: bytes) -> None:
        check_key_name(name)
        if len(raw) != 32:
            raise FormatError(f"public key {name!r}: expected 32 bytes, got {len(raw)}")
        self.name = name
        self._raw = raw
        try:
            self._key = Ed25519PublicKey.from_public_bytes(raw)
        except ValueError as exc:
            raise FormatError(f"public key {name!r}: {exc}") from None

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        """Parse ``<name>:<base64 of 32 bytes>``."""
        return cls(*_split(text, "public key", 32))

    def to_string(self) -> str:
        return f"{self.name}:{base64.b64encode(self._raw).decode()}"

    def verify(self, message: str | bytes, signature: str) -> bool:
        """Whether ``signature`` (``<name>:<base64>``) is this key's signature of ``message``.

        Returns ``False`` (never raises) for a signature by another key name and for a malformed
        signature string, so callers can try every ``Sig`` of a narinfo against every key.
        """
        name, colon, encoded = signature.partition(":")
        if not colon or name != self.name:
            return False
        try:
            raw = base64.b64decode(encoded.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            return False
        if len(raw) != 64:
            return False
        data = message.encode() if isinstance(message, str) else message
        try:
            self._key.verify(raw, data)
        except InvalidSignature:
            return False
        return True

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PublicKey):
            return NotImplemented
        return (self.name, self._raw) == (other.name, other._raw)

    def __hash__(self) -> int:
        return hash((self.name, self._raw))

    def __repr__(self) -> str:
        return f"PublicKey({self.to_string()!r})"


class SecretKey:
    """A named ed25519 signing key in Nix's format."""

    __slots__ = ("_key", "_seed", "_text", "name")

    def __init__(self, name: str, seed: bytes) -> None:
        check_key_name(name)
        if len(seed) != 32:
            raise FormatError(f"secret key {name!r}: expected a 32-byte seed, got {len(seed)}")
        self.name = name
        self._seed = seed
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        self._text = ""

    @classmethod
    def parse(cls, text: str) -> SecretKey:
        """Parse ``<name>:<base64 of seed || public key>`` and check the halves belong together."""
        name, raw = _split(text, "secret key", 64)
        key = cls(name, raw[:32])
        if _raw_public(key._key.public_key()) != raw[32:]:
            raise FormatError(f"secret key {name!r}: its public half does not match its seed")
        return key

    @classmethod
    def generate(cls, name: str) -> SecretKey:
        """A new random key (what ``nix-store --generate-binary-cache-key`` does)."""
        seed = Ed25519PrivateKey.generate().private_bytes_raw()
        return cls(name, seed)

    def to_string(self) -> str:
        if not self._text:  # computed once: the served-narinfo memory keys on it per request
            raw = self._seed + _raw_public(self._key.public_key())
            self._text = f"{self.name}:{base64.b64encode(raw).decode()}"
        return self._text

    def public_key(self) -> PublicKey:
        return PublicKey(self.name, _raw_public(self._key.public_key()))

    def sign(self, message: str | bytes) -> str:
        """``<name>:<base64 signature>`` of ``message`` (UTF-8 encoded when a string)."""
        data = message.encode() if isinstance(message, str) else message
        return f"{self.name}:{base64.b64encode(self._key.sign(data)).decode()}"

    def __repr__(self) -> str:
        return f"SecretKey(name={self.name!r}, <secret>)"
