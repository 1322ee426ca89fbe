"""Cache names and opaque object paths."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from larder.errors import FormatError
from larder.protocol.names import check_cache_name, check_object_path


@pytest.mark.parametrize("name", ["main", "pr", "a", "0", "team-x_1", "a" * 63, "apis", "static2"])
def test_valid_cache_names(name: str) -> None:
    assert check_cache_name(name) == name


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "invalid cache name ''"),
        ("Main", "invalid cache name"),
        ("-x", "invalid cache name"),
        ("_x", "invalid cache name"),
        ("a" * 64, "invalid cache name"),
        ("a.b", "invalid cache name"),
        ("a/b", "invalid cache name"),
        ("caf\u00e9", "invalid cache name"),
        ("main\n", "invalid cache name"),
        ("api", "invalid cache name 'api': it is reserved"),
        ("healthz", "it is reserved"),
        ("readyz", "it is reserved"),
        ("metrics", "it is reserved"),
        ("static", "it is reserved"),
    ],
)
def test_invalid_cache_names(name: str, message: str) -> None:
    with pytest.raises(FormatError, match=re.escape(message)):
        check_cache_name(name)


@pytest.mark.parametrize(
    "path",
    [
        "lcy4f45x4mfwzinmvk2xg1vw63196ksb.ls",
        "log/dqm7z6mlsqqyr1nsffwbcyy8d2jdm6d0-larder-leaf.drv",
        "realisations/sha256:1dv112qm133k8j4k7a2nd9jyq8qpp82syfk7aa652i9kfan2agkz!out.doi",
        "build-trace-v2/abc/out.json",
        "debuginfo/0123456789abcdef0123456789abcdef01234567",
        "a/b/c/d/e/f/g/h",
        "x@y+z=w",
        "log/0000000000000000000000000000000a-name?with=query.drv",
        ".hidden",
        "a" * 255,
        "/".join(["a" * 255, "b" * 255]),
        "/".join(["a" * 255, "b" * 254, "c"]),  # 512 characters, the most a path may have
        "log/nar",
        "debuginfo/x.narinfo",
    ],
)
def test_valid_object_paths(path: str) -> None:
    assert check_object_path(path) == path


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("", "it is empty"),
        ("/log/x", "it must be relative"),
        ("log//x", "empty, '.' or '..' segment"),
        ("log/", "empty, '.' or '..' segment"),
        ("./x", "empty, '.' or '..' segment"),
        ("log/../../etc/passwd", "empty, '.' or '..' segment"),
        ("..", "empty, '.' or '..' segment"),
        ("a/b/c/d/e/f/g/h/i", "more than 8 segments"),
        ("/".join(["a" * 255] * 3), "longer than 512 characters"),
        ("/".join(["a" * 255, "b" * 255, "c"]), "longer than 512 characters"),  # 513
        ("log/" + "a" * 256, "a segment longer than 255 characters"),
        ("log\\x", "invalid character '\\\\'"),
        ("log/a b", "invalid character ' '"),
        ("log/a%2f", "invalid character '%'"),
        ("log/x\0", "invalid character '\\x00'"),
        ("log/caf\u00e9", "invalid character"),
        ("log/x#y", "invalid character '#'"),
        ("nar/1dv112qm133k8j4k7a2nd9jyq8qpp82syfk7aa652i9kfan2agkz.nar.xz", "own routes"),
        ("rustc/manifest/" + "ab" * 32, "own routes"),
        ("rustc/v2/manifests/x", "own routes"),
        ("sccache/a/b", "own routes"),
        ("nix-cache-info", "own routes"),
        ("lcy4f45x4mfwzinmvk2xg1vw63196ksb.narinfo", "own routes"),
        # sccache's probe, answered wherever it is asked for: stored, it could not be read.
        (".sccache_check", "own routes"),
        ("log/.sccache_check", "own routes"),
    ],
)
def test_invalid_object_paths(path: str, message: str) -> None:
    with pytest.raises(FormatError, match=re.escape(message)):
        check_object_path(path)


@given(st.text(max_size=80))
def test_object_paths_are_safe(path: str) -> None:
    try:
        check_object_path(path)
    except FormatError:
        return
    parts = path.split("/")
    assert not path.startswith("/") and all(p not in ("", ".", "..") for p in parts)
    assert all(c.isascii() and c.isprintable() and c not in " \\%#" for c in path)
