"""Nix hash strings.

Spec: Nix ``src/libutil/hash.cc`` (``Hash::parseAny``, ``Hash::to_string``). A hash is an
algorithm and a digest; Nix writes it as ``<algo>:<nix32>`` (narinfo, fingerprints) or as SRI
``<algo>-<base64>`` (``nix path-info --json`` since 2.4), and reads the digest in base-16,
nix32 or base-64, telling the encoding by its length. Supported algorithms and digest sizes:
md5 (16), sha1 (20), sha256 (32), sha512 (64).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from larder.errors import FormatError
from larder.protocol import nix32

HASH_SIZES: dict[str, int] = {"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64}


def _show(s: str) -> str:
    return repr(s) if len(s) <= 100 else repr(s[:97] + "...")


@dataclass(frozen=True)
class NixHash:
    """A digest and the algorithm that made it."""

    algo: str
    digest: bytes

    def __post_init__(self) -> None:
        size = HASH_SIZES.get(self.algo)
        if size is None:
            raise FormatError(f"unsupported hash algorithm {self.algo!r}")
        if len(self.digest) != size:
            raise FormatError(f"a {self.algo} digest has {size} bytes, not {len(self.digest)}")

    def nix32(self) -> str:
        return nix32.encode(self.digest)

    def to_nix(self) -> str:
        """``<algo>:<nix32>``, the form narinfos and fingerprints use."""
        return f"{self.algo}:{self.nix32()}"

    def sri(self) -> str:
        """``<algo>-<base64>`` (Subresource Integrity)."""
        return f"{self.algo}-{base64.b64encode(self.digest).decode()}"

    def hex(self) -> str:
        return self.digest.hex()


def _decode_digest(
    algo: str, text: str, original: str, *, base64_only: bool = False, size: int | None = None
) -> bytes:
    size = HASH_SIZES[algo] if size is None else size
    b64_len = (size + 2) // 3 * 4
    if base64_only and len(text) != b64_len:
        raise FormatError(
            f"SRI hash {_show(original)}: a {algo} digest in base64 has {b64_len} characters,"
            f" not {len(text)}"
        )
    if len(text) == b64_len:
        try:
            digest = base64.b64decode(text.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise FormatError(f"hash {_show(original)}: invalid base64 digest") from None
        if len(digest) != size:
            raise FormatError(f"hash {_show(original)}: base64 digest is not {size} bytes")
        if base64.b64encode(digest).decode() != text:
            raise FormatError(f"hash {_show(original)}: non-canonical base64 digest")
        return digest
    if len(text) == 2 * size:
        if not all(c in "0123456789abcdefABCDEF" for c in text):
            raise FormatError(f"hash {_show(original)}: invalid base-16 digest")
        return bytes.fromhex(text)
    if len(text) == nix32.encoded_length(size):
        try:
            return nix32.decode(text)
        except FormatError as exc:
            raise FormatError(f"hash {_show(original)}: {exc.message}") from None
    raise FormatError(
        f"hash {_show(original)}: a {algo} digest has {2 * size} (base-16), "
        f"{nix32.encoded_length(size)} (nix32) or {b64_len} (base64) characters, not {len(text)}"
    )


def parse_digest(algo: str, text: str, size: int) -> bytes:
    """A ``size``-byte digest of ``algo`` in base-16, nix32 or base64 (told apart by length), for
    algorithms :class:`NixHash` does not hold (BLAKE3 in content addresses)."""
    return _decode_digest(algo, text, text, size=size)


def _check_algo(algo: str, original: str) -> str:
    if algo not in HASH_SIZES:
        raise FormatError(
            f"hash {_show(original)}: unsupported algorithm {algo!r} "
            f"(supported: {', '.join(sorted(HASH_SIZES))})"
        )
    return algo


def parse_hash(s: str, algo: str | None = None) -> NixHash:
    """Parse ``algo:<digest>``, SRI ``algo-<base64>`` or, when ``algo`` is given, a bare digest.

    The digest may be base-16, nix32 or base64 (told apart by length). When both ``algo`` and a
    prefix are present they must agree.
    """
    if algo is not None:
        _check_algo(algo, s)
    prefix, colon, rest = s.partition(":")
    if colon:
        found = _check_algo(prefix, s)
        sri = False
    else:
        prefix, dash, rest = s.partition("-")
        if dash and prefix in HASH_SIZES:
            found = prefix
            sri = True
        elif algo is not None:
            return NixHash(algo, _decode_digest(algo, s, s))
        else:
            raise FormatError(
                f"hash {_show(s)} has no algorithm: expected <algo>:<digest> or <algo>-<base64>"
            )
    if algo is not None and found != algo:
        raise FormatError(f"hash {_show(s)}: expected a {algo} hash, got {found}")
    return NixHash(found, _decode_digest(found, rest, s, base64_only=sri))


def sha256_nix(digest: bytes) -> str:
    """``sha256:<nix32>`` of a raw sha256 digest."""
    return NixHash("sha256", digest).to_nix()
