"""NAR: real NARs from `nix-store --dump`, dump_path against Nix, malformed archives, chunking."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from larder.errors import FormatError
from larder.protocol.hashes import parse_hash
from larder.protocol.nar import (
    MAX_DEPTH,
    NAR_MAGIC,
    NarValidator,
    dump_path,
    nar_string,
    write_nar,
)

from .conftest import FIXTURES, RealNar, manifest, store_nars

Node = Mapping[str, object]


def validate(data: bytes, splits: Iterable[int] = ()) -> NarValidator:
    """Feed ``data`` cut at ``splits``, then finish; return the validator."""
    validator = NarValidator()
    start = 0
    for cut in sorted(set(splits)):
        validator.feed(data[start:cut])
        start = cut
    validator.feed(data[start:])
    validator.finish()
    return validator


def outcome(data: bytes, splits: Iterable[int] = ()) -> str | None:
    try:
        validate(data, splits)
    except FormatError as exc:
        return exc.message
    return None


# -- real NARs --------------------------------------------------------------------------------


@pytest.mark.parametrize("real", manifest(), ids=lambda nar: nar.name)
@pytest.mark.parametrize("chunk", [1, 7, 8, 13, 4096])
def test_real_nars_validate(real: RealNar, chunk: int) -> None:
    validator = validate(real.nar, range(chunk, len(real.nar), chunk))
    assert validator.size == real.nar_size == len(real.nar)
    assert validator.done


@pytest.mark.parametrize("real", store_nars(), ids=lambda nar: nar.name)
def test_real_nar_hashes_match_nix(real: RealNar) -> None:
    assert real.nar_hash is not None
    assert hashlib.sha256(real.nar).digest() == parse_hash(real.nar_hash).digest


@pytest.mark.parametrize(
    "real", [nar for nar in manifest() if len(nar.nar) <= 4096], ids=lambda nar: nar.name
)
def test_every_truncation_of_real_nars_is_rejected(real: RealNar) -> None:
    for end in range(len(real.nar)):
        with pytest.raises(FormatError):
            validate(real.nar[:end])


# The tree tools/make_fixtures.sh builds with shell commands as $work/tree; keep in step.
TREE: Node = {
    "type": "directory",
    "entries": {
        "bin": {
            "type": "directory",
            "entries": {
                "hello": {
                    "type": "regular",
                    "executable": True,
                    "contents": b"#!/bin/sh\necho hello\n",
                },
                "hi": {"type": "symlink", "target": "hello"},
            },
        },
        "docs": {"type": "symlink", "target": "../share/doc"},
        "abs-link": {"type": "symlink", "target": "/nix/store/absolute-target"},
        "share": {
            "type": "directory",
            "entries": {
                "doc": {
                    "type": "directory",
                    "entries": {
                        "README": {"type": "regular", "contents": b"seven b"},
                        "deep": {
                            "type": "directory",
                            "entries": {
                                "er": {
                                    "type": "directory",
                                    "entries": {
                                        "eight": {"type": "regular", "contents": b"exactly8"}
                                    },
                                }
                            },
                        },
                    },
                },
                "empty": {"type": "regular", "contents": b""},
                "Upper": {"type": "regular", "contents": b"upper\n"},
                "big": {"type": "regular", "contents": b"q" * 20000},
            },
        },
        "empty-dir": {"type": "directory", "entries": {}},
        "a-b": {"type": "directory", "entries": {"one": {"type": "regular", "contents": b"x"}}},
        "a.b": {"type": "directory", "entries": {"two": {"type": "regular", "contents": b"y"}}},
        "a": {"type": "regular", "executable": True, "contents": b"z"},
    },
}


def materialise(node: Node, path: Path) -> None:
    """Create the file system tree ``node`` describes at ``path``."""
    kind = node["type"]
    if kind == "regular":
        contents = node["contents"]
        assert isinstance(contents, bytes)
        path.write_bytes(contents)
        path.chmod(0o755 if node.get("executable") else 0o644)
    elif kind == "symlink":
        target = node["target"]
        assert isinstance(target, str | bytes)
        os.symlink(target, path)
    else:
        path.mkdir()
        entries = node["entries"]
        assert isinstance(entries, Mapping)
        for name, child in entries.items():
            materialise(
                child, Path(os.fsdecode(os.path.join(os.fsencode(path), os.fsencode(name))))
            )


def test_dump_path_equals_nix_store_dump(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    materialise(TREE, tree)
    expected = (FIXTURES / "nars" / "tree-dump.nar").read_bytes()
    assert b"".join(dump_path(tree)) == expected
    assert b"".join(dump_path(str(tree), chunk_size=64)) == expected
    assert write_nar(TREE) == expected
    assert (
        b"".join(dump_path(tree / "share" / "doc" / "README"))
        == (FIXTURES / "nars" / "tree-dump-file.nar").read_bytes()
    )
    assert (
        b"".join(dump_path(tree / "bin" / "hi"))
        == (FIXTURES / "nars" / "tree-dump-symlink.nar").read_bytes()
    )


def test_real_store_path_nar_matches_its_description() -> None:
    """The `larder-tree` derivation's output is the same layout minus the extras of TREE."""
    entries = dict(TREE["entries"])  # type: ignore[call-overload]
    for extra in ("abs-link", "a-b", "a.b", "a"):
        del entries[extra]
    share = dict(entries["share"]["entries"])
    del share["big"]
    entries["share"] = {"type": "directory", "entries": share}
    nar = (FIXTURES / "nars" / "larder-tree.nar").read_bytes()
    assert write_nar({"type": "directory", "entries": entries}) == nar


def test_only_the_owner_execute_bit_counts(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"data")
    plain = write_nar({"type": "regular", "contents": b"data"})
    executable = write_nar({"type": "regular", "contents": b"data", "executable": True})
    for mode, expected in (
        (0o644, plain),
        (0o011, plain),
        (0o100, executable),
        (0o700, executable),
    ):
        path.chmod(mode)
        assert b"".join(dump_path(path)) == expected, oct(mode)
    path.chmod(0o644)


def test_dump_path_streams_in_bounded_pieces(tmp_path: Path) -> None:
    big = tmp_path / "big"
    with big.open("wb") as f:
        for _ in range(48):
            f.write(os.urandom(65536))
    (tmp_path / "small").write_bytes(b"s" * 100)
    chunk = 256 * 1024
    pieces = list(dump_path(tmp_path, chunk_size=chunk))
    assert max(len(p) for p in pieces) <= chunk + 8192
    assert len(pieces) > 10
    nar = b"".join(pieces)
    validate(nar)
    assert big.read_bytes() in nar


def test_dump_path_rejects_special_files(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(FormatError, match="cannot be put in a NAR"):
        b"".join(dump_path(tmp_path))


def test_dump_path_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        b"".join(dump_path(tmp_path / "nothing"))


# -- malformed --------------------------------------------------------------------------------


def nar(*tokens: bytes) -> bytes:
    return b"".join(nar_string(t) for t in tokens)


REG = (b"(", b"type", b"regular", b"contents", b"hi", b")")


def directory(*entries: tuple[bytes, tuple[bytes, ...]]) -> tuple[bytes, ...]:
    out: list[bytes] = [b"(", b"type", b"directory"]
    for name, node in entries:
        out += [b"entry", b"(", b"name", name, b"node", *node, b")"]
    out.append(b")")
    return tuple(out)


def raw_string(length: int, body: bytes, padding: bytes) -> bytes:
    return length.to_bytes(8, "little") + body + padding


def nested(depth: int) -> tuple[bytes, ...]:
    node: tuple[bytes, ...] = REG
    for _ in range(depth):
        node = directory((b"d", node))
    return node


VALID = nar(NAR_MAGIC, *directory((b"a", REG), (b"b", REG)))

MALFORMED: list[tuple[str, bytes, str]] = [
    ("empty", b"", "NAR is empty"),
    ("magic only", nar(NAR_MAGIC), "byte 24 (in /): NAR is truncated: expected '('"),
    ("wrong magic", nar(b"nix-archive-2", *REG), "not a NAR: magic is b'nix-archive-2'"),
    ("long magic", nar(b"nix-archive-10", *REG), "expected 'nix-archive-1', got a string of 14"),
    ("not a NAR", b"\x1f\x8b\x08\x00" + bytes(100), "expected 'nix-archive-1', got a string of"),
    ("magic bad padding", raw_string(13, NAR_MAGIC, b"\0\0\1"), "byte 21 (in /): non-zero padding"),
    (
        "trailing zeros",
        VALID + bytes(8),
        f"byte {len(VALID)} (in /): unexpected data after the end",
    ),
    ("trailing byte", VALID + b"x", "unexpected data after the end of the NAR"),
    ("trailing node", VALID + nar(*REG), "unexpected data after the end of the NAR"),
    ("truncated", VALID[:-1], "NAR is truncated: expected 'entry' or ')'"),
    ("truncated contents", nar(NAR_MAGIC, *REG)[:-24], "2 bytes of file contents missing"),
    ("truncated length", nar(NAR_MAGIC, *REG)[:-20], "truncated: expected file contents"),
    ("no open paren", nar(NAR_MAGIC, b"type", b"regular"), "expected '(', got a string of 4"),
    ("wrong open", nar(NAR_MAGIC, b")"), "expected '(', got b')'"),
    ("Type", nar(NAR_MAGIC, b"(", b"Type"), "expected 'type', got b'Type'"),
    ("unknown type", nar(NAR_MAGIC, b"(", b"type", b"fifo"), "got b'fifo'"),
    ("missing contents", nar(NAR_MAGIC, b"(", b"type", b"regular", b")"), "got b')'"),
    (
        "executable not empty",
        nar(NAR_MAGIC, b"(", b"type", b"regular", b"executable", b"x"),
        "expected '', got a string of 1 bytes",
    ),
    (  # Nix's unpacking would fail on it, after larder stored and served it
        "empty before contents",
        nar(NAR_MAGIC, b"(", b"type", b"regular", b"", b"contents", b"hi", b")"),
        "expected 'executable' or 'contents', got b''",
    ),
    (
        "file closed by (",
        nar(NAR_MAGIC, b"(", b"type", b"regular", b"contents", b"hi", b"("),
        "expected ')', got b'('",
    ),
    (
        "file closed by empty",
        nar(NAR_MAGIC, b"(", b"type", b"regular", b"contents", b"hi", b""),
        "expected ')', got b''",
    ),
    (
        "symlink closed by x",
        nar(NAR_MAGIC, b"(", b"type", b"symlink", b"target", b"t", b"x"),
        "expected ')', got b'x'",
    ),
    (
        "executable after contents",
        nar(NAR_MAGIC, b"(", b"type", b"regular", b"contents", b"", b"executable", b"", b")"),
        "expected ')', got a string of 10 bytes",
    ),
    (
        "two contents",
        nar(NAR_MAGIC, b"(", b"type", b"regular", b"contents", b"", b"contents", b"", b")"),
        "expected ')'",
    ),
    (
        "contents bad padding",
        nar(NAR_MAGIC, b"(", b"type", b"regular", b"contents")
        + raw_string(3, b"abc", b"\0\0\0\0\x01")
        + nar(b")"),
        "non-zero padding after a string",
    ),
    (
        "contents too long",
        nar(NAR_MAGIC, b"(", b"type", b"regular", b"contents") + (1 << 63).to_bytes(8, "little"),
        "file contents length 9223372036854775808 is too large",
    ),
    (
        "token of 1 TiB",
        nar(NAR_MAGIC) + (1 << 40).to_bytes(8, "little"),
        "expected '(', got a string of 1099511627776 bytes",
    ),
    (
        "symlink empty target",
        nar(NAR_MAGIC, b"(", b"type", b"symlink", b"target", b"", b")"),
        "symlink target is empty",
    ),
    (
        "symlink NUL",
        nar(NAR_MAGIC, b"(", b"type", b"symlink", b"target", b"a\0b", b")"),
        "contains NUL",
    ),
    (
        "symlink too long",
        nar(NAR_MAGIC, b"(", b"type", b"symlink", b"target", b"a" * 4097, b")"),
        "expected a symlink target, got a string of 4097 bytes",
    ),
    (
        "symlink no target",
        nar(NAR_MAGIC, b"(", b"type", b"symlink", b")"),
        "expected 'target', got b')'",
    ),
    ("unsorted", nar(NAR_MAGIC, *directory((b"b", REG), (b"a", REG))), "not sorted: b'a' after"),
    ("uppercase after", nar(NAR_MAGIC, *directory((b"a", REG), (b"B", REG))), "not sorted"),
    ("duplicate", nar(NAR_MAGIC, *directory((b"a", REG), (b"a", REG))), "duplicate entry b'a'"),
    ("empty name", nar(NAR_MAGIC, *directory((b"", REG))), "entry name is empty"),
    ("dot", nar(NAR_MAGIC, *directory((b".", REG))), "entry name b'.' is not allowed"),
    ("dotdot", nar(NAR_MAGIC, *directory((b"..", REG))), "entry name b'..' is not allowed"),
    ("slash", nar(NAR_MAGIC, *directory((b"a/b", REG))), "contains '/' or NUL"),
    ("NUL name", nar(NAR_MAGIC, *directory((b"a\0", REG))), "contains '/' or NUL"),
    ("long name", nar(NAR_MAGIC, *directory((b"n" * 1025, REG))), "an entry name, got a string"),
    (
        "nested error path",
        nar(NAR_MAGIC, *directory((b"x", directory((b"y", directory((b"..", REG))))))),
        "(in /x/y): entry name b'..' is not allowed",
    ),
    (
        "entry typo",
        nar(NAR_MAGIC, b"(", b"type", b"directory", b"entri"),
        "expected 'entry' or ')', got b'entri'",
    ),
    (
        "entry without paren",
        nar(NAR_MAGIC, b"(", b"type", b"directory", b"entry", b"name"),
        "expected '(', got a string of 4",
    ),
    (
        "entry without name",
        nar(NAR_MAGIC, b"(", b"type", b"directory", b"entry", b"(", b"node"),
        "expected 'name', got b'node'",
    ),
    (
        "node typo",
        nar(NAR_MAGIC, b"(", b"type", b"directory")
        + nar(b"entry", b"(", b"name", b"a", b"nodx", *REG, b")", b")"),
        "expected 'node', got b'nodx'",
    ),
    (
        "entry not closed",
        nar(NAR_MAGIC, b"(", b"type", b"directory", b"entry", b"(", b"name", b"a", b"node", *REG)
        + nar(b"entry"),
        "expected ')', got a string of 5 bytes",
    ),
    ("too deep", nar(NAR_MAGIC, *nested(MAX_DEPTH + 1)), "directories nested deeper than 256"),
    (
        "symlink target no system stores",
        nar(NAR_MAGIC, b"(", b"type", b"symlink", b"target", b"t" * 4096, b")"),
        "expected a symlink target, got a string of 4096 bytes",
    ),
]


@pytest.mark.parametrize(
    ("data", "message"), [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED]
)
def test_malformed(data: bytes, message: str) -> None:
    for splits in ((), range(1, len(data)), range(5, len(data), 8), range(8, len(data), 8)):
        with pytest.raises(FormatError, match=re.escape(message)):
            validate(data, splits)


def test_huge_token_length_is_rejected_before_buffering() -> None:
    validator = NarValidator()
    validator.feed(nar(NAR_MAGIC))
    with pytest.raises(FormatError, match="got a string of 1099511627776 bytes"):
        validator.feed((1 << 40).to_bytes(8, "little"))
    with pytest.raises(FormatError, match="got a string of 1099511627776 bytes"):
        validator.feed(b"more")  # the error sticks
    with pytest.raises(FormatError, match="got a string of 1099511627776 bytes"):
        validator.finish()


def test_deepest_allowed_nesting() -> None:
    validate(nar(NAR_MAGIC, *nested(MAX_DEPTH)))


def test_longest_symlink_target_linux_stores() -> None:
    validate(nar(NAR_MAGIC, b"(", b"type", b"symlink", b"target", b"t" * 4095, b")"))


def test_feed_accepts_any_buffer() -> None:
    validator = NarValidator()
    validator.feed(bytearray(VALID[:10]))
    validator.feed(memoryview(VALID)[10:30])
    validator.feed(memoryview(VALID[30:]).cast("c"))
    validator.finish()
    assert validator.size == len(VALID)


def test_large_file_throughput() -> None:
    """Skipping file contents is arithmetic: far above 1 GiB/s when fed 256 KiB chunks."""
    size = 1 << 30
    chunk = bytes(256 * 1024)
    head = nar(NAR_MAGIC, b"(", b"type", b"regular", b"contents")
    validator = NarValidator()
    start = time.perf_counter()
    validator.feed(head + size.to_bytes(8, "little"))
    for _ in range(size // len(chunk)):
        validator.feed(chunk)
    validator.feed(nar(b")"))
    validator.finish()
    elapsed = time.perf_counter() - start
    assert size / elapsed > 1 << 30, f"{size / elapsed / (1 << 30):.2f} GiB/s"


# -- properties -------------------------------------------------------------------------------

entry_names = st.binary(min_size=1, max_size=12).filter(
    lambda n: n not in (b".", b"..") and b"/" not in n and b"\0" not in n
)
targets = st.binary(min_size=1, max_size=40).filter(lambda t: b"\0" not in t)
leaves = st.one_of(
    st.fixed_dictionaries(
        {
            "type": st.just("regular"),
            "contents": st.binary(max_size=100),
            "executable": st.booleans(),
        }
    ),
    st.fixed_dictionaries({"type": st.just("symlink"), "target": targets}),
)
trees = st.recursive(
    leaves,
    lambda children: st.fixed_dictionaries(
        {
            "type": st.just("directory"),
            "entries": st.dictionaries(entry_names, children, max_size=5),
        }
    ),
    max_leaves=20,
)


@settings(deadline=None)
@given(trees, st.data())
def test_write_nar_validates_with_any_chunking(tree: Node, data: st.DataObject) -> None:
    encoded = write_nar(tree)
    splits = data.draw(st.lists(st.integers(0, len(encoded)), max_size=20))
    validator = validate(encoded, splits)
    assert validator.size == len(encoded)


@settings(deadline=None)
@given(trees, st.data())
def test_chunking_never_changes_the_outcome(tree: Node, data: st.DataObject) -> None:
    encoded = bytearray(write_nar(tree))
    action = data.draw(st.sampled_from(["flip", "truncate", "append", "none"]))
    if action == "flip":
        pos = data.draw(st.integers(0, len(encoded) - 1))
        encoded[pos] ^= data.draw(st.integers(1, 255))
    elif action == "truncate":
        del encoded[data.draw(st.integers(0, len(encoded) - 1)) :]
    elif action == "append":
        encoded += data.draw(st.binary(min_size=1, max_size=16))
    mutated = bytes(encoded)
    splits = data.draw(st.lists(st.integers(0, len(mutated)), max_size=30))
    assert outcome(mutated, splits) == outcome(mutated)
    assert outcome(mutated, range(1, len(mutated))) == outcome(mutated)
    if action == "none":
        assert outcome(mutated) is None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees.filter(lambda t: t["type"] == "directory"))
def test_dump_path_equals_write_nar(tree: Node) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        materialise(tree, root)
        assert b"".join(dump_path(root, chunk_size=64)) == write_nar(tree)


def test_write_nar_rejects_bad_trees() -> None:
    with pytest.raises(FormatError, match=re.escape("entry name b'..' is not allowed")):
        write_nar({"type": "directory", "entries": {"..": {"type": "regular", "contents": b""}}})
    with pytest.raises(FormatError, match="duplicate entry name"):
        write_nar(
            {
                "type": "directory",
                "entries": {
                    "a": {"type": "regular", "contents": b""},
                    b"a": {"type": "regular", "contents": b""},
                },
            }
        )
    with pytest.raises(FormatError, match="symlink target is empty"):
        write_nar({"type": "symlink", "target": ""})
    with pytest.raises(TypeError, match="unknown node type"):
        write_nar({"type": "fifo"})
