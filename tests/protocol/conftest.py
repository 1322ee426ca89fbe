"""Golden vectors made by real Nix (see tools/make_fixtures.sh) and helpers to load them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "nix"
COMPRESSED_DIRS = ("xz", "zstd", "bzip2")


@dataclass(frozen=True)
class RealNar:
    """One NAR made by ``nix-store --dump`` and what ``nix path-info --json`` said about it."""

    name: str
    path: str | None
    nar: bytes
    nar_hash: str | None
    nar_size: int
    sha256_hex: str
    references: tuple[str, ...]
    deriver: str | None
    ca: str | None


@cache
def manifest() -> tuple[RealNar, ...]:
    doc: dict[str, Any] = json.loads((FIXTURES / "manifest.json").read_text())
    return tuple(
        RealNar(
            name=item["name"],
            path=item["path"],
            nar=(FIXTURES / item["nar"]).read_bytes(),
            nar_hash=item.get("narHash"),
            nar_size=item["narSize"],
            sha256_hex=item["narSha256Hex"],
            references=tuple(item.get("references") or ()),
            deriver=item.get("deriver"),
            ca=item.get("ca"),
        )
        for item in doc["paths"]
    )


def store_nars() -> tuple[RealNar, ...]:
    """The NARs of real store paths (those that have a narinfo)."""
    return tuple(nar for nar in manifest() if nar.path is not None)


def narinfo_files() -> list[Path]:
    """Every .narinfo Nix wrote, for every compression."""
    return sorted(FIXTURES.glob("*/*.narinfo"))


def nix32_vectors() -> list[dict[str, str]]:
    vectors: list[dict[str, str]] = json.loads((FIXTURES / "nix32.json").read_text())
    return vectors


def real_path(name: str) -> str:
    """The store path of the fixture derivation or added path called ``name``."""
    (path,) = [nar.path for nar in store_nars() if nar.name == name]
    assert path is not None
    return path


def narinfo_path(name: str, compression: str = "xz") -> Path:
    """The .narinfo Nix wrote for the store path called ``name``."""
    store_hash = real_path(name).removeprefix("/nix/store/")[:32]
    return FIXTURES / compression / f"{store_hash}.narinfo"


def fixture_id(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"
