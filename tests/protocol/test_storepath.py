"""Store paths: real paths Nix made, Nix's name rules, malformed paths."""

from __future__ import annotations

import re

import pytest

from larder.errors import FormatError
from larder.protocol.storepath import STORE_DIR, StorePath, check_hash_part

from .conftest import store_nars

HASH = "lcy4f45x4mfwzinmvk2xg1vw63196ksb"


@pytest.mark.parametrize("path", [nar.path for nar in store_nars()])
def test_real_paths(path: str) -> None:
    parsed = StorePath.parse(path)
    assert parsed.full == path == str(parsed)
    assert parsed.base == path.removeprefix(STORE_DIR + "/")
    assert StorePath.parse_base(parsed.base) == parsed


@pytest.mark.parametrize(
    "name",
    ["a", "foo-1.0", "x?y=z+_", "larder-note.txt", "A" * 211, "-dash", "a..b", "_",
     ".hidden", "..dots...-", ".config-1.0", "...", ".a-b", "..a-b"],
)  # fmt: skip
def test_valid_names(name: str) -> None:
    assert StorePath(HASH, name).name == name


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "store path name is empty"),
        (".", "is not valid"),
        ("..", "is not valid"),
        (".-foo", "is not valid"),
        ("..-foo", "is not valid"),
        ("a/b", "invalid character '/'"),
        ("a b", "invalid character ' '"),
        ("caf\u00e9", "invalid character"),
        ("a\nb", "invalid character '\\n'"),
        ("a:b", "invalid character ':'"),
        ("A" * 212, "longer than 211 characters"),
    ],
)
def test_invalid_names(name: str, message: str) -> None:
    with pytest.raises(FormatError, match=re.escape(message)):
        StorePath(HASH, name)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("", "is not in /nix/store"),
        ("/gnu/store/" + HASH + "-x", "is not in /nix/store"),
        ("/nix/store2/" + HASH + "-x", "is not in /nix/store"),
        ("nix/store/" + HASH + "-x", "is not in /nix/store"),
        ("/nix/store/" + HASH, "expected <hash>-<name>"),
        ("/nix/store/" + HASH + "-", "expected <hash>-<name>"),
        ("/nix/store/" + HASH + "_x", "expected <hash>-<name>"),
        ("/nix/store/" + HASH + "-x/bin", "invalid character '/'"),
        ("/nix/store/" + HASH[:-1] + "e-x", "invalid store path hash"),
        ("/nix/store/" + HASH[:-1] + "-x", "expected <hash>-<name>"),
        ("/nix/store/" + HASH.upper() + "-x", "invalid store path hash"),
    ],
)
def test_invalid_paths(path: str, message: str) -> None:
    with pytest.raises(FormatError, match=re.escape(message)):
        StorePath.parse(path)


def test_check_hash_part() -> None:
    assert check_hash_part(HASH) == HASH
    for bad in ("", HASH[:-1], HASH + "0", HASH[:-1] + "e", HASH[:-1] + "/", "../" + HASH[3:]):
        with pytest.raises(FormatError, match="invalid store path hash"):
            check_hash_part(bad)


def test_order_is_by_base_name() -> None:
    paths = [StorePath.parse(nar.path) for nar in store_nars() if nar.path]
    assert [p.base for p in sorted(paths)] == sorted(p.base for p in paths)
