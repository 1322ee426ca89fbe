"""The store path a narinfo's content address makes, as Nix computes it before trusting ``CA``.

A store path's hash part is the nix32 of ``SHA-256(<type>:<algo>:<hex digest>:/nix/store:<name>)``
folded to 20 bytes (byte ``i`` XORed into byte ``i mod 20``). A content address (``CA``) fixes the
type and digest:

* ``text:sha256:<h>`` (``builtins.toFile``, ``.drv`` files): type ``text``, then ``:<path>`` for
  each reference in store path order; a text path cannot refer to itself.
* ``fixed:r:sha256:<h>`` (``nix-store --add``, recursive fixed outputs, content-addressed
  derivations): type ``source``, then ``:<path>`` for each other reference in store path order,
  then ``:self`` if it refers to itself.
* any other ``fixed:[r:|git:]<algo>:<h>``: no references at all; type ``output:out``, digest
  ``SHA-256(fixed:out:[r:|git:]<algo>:<hex of h>:)``. ``git:`` takes ``sha1`` or ``sha256``.

``<h>`` is ``<algo>:<digest>`` in any encoding Nix reads (base-16, nix32, base64), never SRI.
Nix checks a substituted path against this and, where they differ, aborts (2.8 and later) instead
of refusing it: a narinfo whose ``CA`` does not make its store path must never be served.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from larder.errors import FormatError
from larder.protocol import nix32
from larder.protocol.hashes import HASH_SIZES, parse_digest
from larder.protocol.storepath import STORE_DIR, StorePath

#: Digest sizes of the algorithms a content address may use (BLAKE3 besides Nix's usual four).
_ALGO_SIZES = {**HASH_SIZES, "blake3": 32}


def _store_hash(kind: str, algo: str, digest: bytes, name: str) -> str:
    text = f"{kind}:{algo}:{digest.hex()}:{STORE_DIR}:{name}"
    full = hashlib.sha256(text.encode()).digest()
    folded = bytearray(20)
    for i, byte in enumerate(full):
        folded[i % 20] ^= byte
    return nix32.encode(bytes(folded))


def _digest(text: str, ca: str) -> tuple[str, bytes]:
    algo, colon, encoded = text.partition(":")
    size = _ALGO_SIZES.get(algo)
    if not colon or size is None:
        algos = ", ".join(sorted(_ALGO_SIZES))
        raise FormatError(f"CA {ca!r}: expected <algo>:<digest>, algo one of {algos}")
    return algo, parse_digest(algo, encoded, size)


def store_hash_of(ca: str, name: str, references: Iterable[StorePath], own_hash: str) -> str:
    """The hash part the content address ``ca`` gives a path named ``name`` with
    ``references`` (the path itself among them when ``own_hash`` is one's hash);
    :class:`FormatError` if Nix could not make such a path."""
    refs = sorted(set(references))
    others = [ref for ref in refs if ref.hash != own_hash]
    self_ref = len(others) != len(refs)
    kind, _, rest = ca.partition(":")
    if kind == "text":
        algo, digest = _digest(rest, ca)
        if algo != "sha256":
            raise FormatError(f"CA {ca!r}: a text content address is sha256")
        if self_ref:
            raise FormatError(f"CA {ca!r}: a text path cannot refer to itself")
        kind = "text" + "".join(f":{ref.full}" for ref in others)
        return _store_hash(kind, algo, digest, name)
    if kind != "fixed":
        raise FormatError(f"CA {ca!r}: expected text:... or fixed:...")
    method = next((m for m in ("r:", "git:") if rest.startswith(m)), "")
    algo, digest = _digest(rest.removeprefix(method), ca)
    if method == "r:" and algo == "sha256":
        kind = "source" + "".join(f":{ref.full}" for ref in others) + (":self" * self_ref)
        return _store_hash(kind, algo, digest, name)
    if method == "git:" and algo not in ("sha1", "sha256"):
        raise FormatError(f"CA {ca!r}: git ingestion is sha1 or sha256")
    if refs:
        raise FormatError(f"CA {ca!r}: only text and fixed:r:sha256 paths may have references")
    inner = f"fixed:out:{method}{algo}:{digest.hex()}:".encode()
    return _store_hash("output:out", "sha256", hashlib.sha256(inner).digest(), name)


def check_store_path(ca: str, path: StorePath, references: Iterable[StorePath]) -> None:
    """Raise :class:`FormatError` unless ``ca`` with ``references`` makes ``path``."""
    made = store_hash_of(ca, path.name, references, path.hash)
    if made != path.hash:
        raise FormatError(
            f"CA {ca!r} with these references makes {STORE_DIR}/{made}-{path.name}, not {path.full}"
        )
