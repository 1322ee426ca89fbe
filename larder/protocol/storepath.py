"""Nix store paths.

Spec: Nix ``src/libstore/path.cc`` (``StorePath``, ``checkName``). A store path is
``/nix/store/<hash>-<name>``: ``<hash>`` is 32 nix32 characters (a 160-bit digest), ``<name>``
is 1 to 211 characters of ``[A-Za-z0-9+-._?=]``, neither ``.`` nor ``..`` and not starting
with ``.-`` or ``..-``. A leading ``.`` is otherwise allowed: Nix 2.4 and later create such
paths (``builtins.toFile ".hidden"``), and Nix made it official in 2.20. The *base name*
``<hash>-<name>`` is how narinfos list references and derivers; the *hash part* names the
``<hash>.narinfo`` file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from larder.errors import FormatError
from larder.protocol import nix32

STORE_DIR = "/nix/store"
HASH_LENGTH = 32
MAX_NAME_LENGTH = 211

_HASH = re.compile(f"[{nix32.ALPHABET}]{{{HASH_LENGTH}}}")
_NAME = re.compile(r"[A-Za-z0-9+\-._?=]+")


def _show(s: str) -> str:
    return repr(s) if len(s) <= 300 else repr(s[:297] + "...")


def check_hash_part(s: str) -> str:
    """Return ``s`` if it is a 32-character nix32 store hash, else raise :class:`FormatError`."""
    if not _HASH.fullmatch(s):
        raise FormatError(f"invalid store path hash {_show(s)}: expected 32 nix32 characters")
    return s


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid store path name, else raise :class:`FormatError`."""
    if not name:
        raise FormatError("store path name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise FormatError(
            f"store path name {_show(name)} is longer than {MAX_NAME_LENGTH} characters"
        )
    if name in (".", "..") or name.startswith((".-", "..-")):
        raise FormatError(
            f"store path name {_show(name)} is not valid: '.' and '..' are not names, nor the "
            "first dash-separated component of one"
        )
    if not _NAME.fullmatch(name):
        bad = next(c for c in name if not _NAME.fullmatch(c))
        raise FormatError(f"store path name {_show(name)} contains invalid character {bad!r}")
    return name


@dataclass(frozen=True, order=True)
class StorePath:
    """A validated store path; ordered like Nix orders them (by base name)."""

    hash: str
    name: str

    def __post_init__(self) -> None:
        check_hash_part(self.hash)
        check_name(self.name)

    @classmethod
    def parse(cls, path: str) -> StorePath:
        """Parse a full path ``/nix/store/<hash>-<name>``."""
        prefix = STORE_DIR + "/"
        if not path.startswith(prefix):
            raise FormatError(f"store path {_show(path)} is not in {STORE_DIR}")
        return cls.parse_base(path[len(prefix) :])

    @classmethod
    def parse_base(cls, base: str) -> StorePath:
        """Parse a base name ``<hash>-<name>``."""
        if len(base) < HASH_LENGTH + 2 or base[HASH_LENGTH] != "-":
            raise FormatError(f"invalid store path base name {_show(base)}: expected <hash>-<name>")
        return cls(base[:HASH_LENGTH], base[HASH_LENGTH + 1 :])

    @property
    def base(self) -> str:
        """``<hash>-<name>``."""
        return f"{self.hash}-{self.name}"

    @property
    def full(self) -> str:
        """``/nix/store/<hash>-<name>``."""
        return f"{STORE_DIR}/{self.hash}-{self.name}"

    def __str__(self) -> str:
        return self.full
