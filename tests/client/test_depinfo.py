"""Parsing rustc's dep-info files."""

from __future__ import annotations

from larder.client.depinfo import parse

SAMPLE = """\
/w/t/deps/generated-0d7b.d: crates/generated/src/lib.rs /w/t/build/g-1/out/sq.rs

/w/t/deps/libgenerated-0d7b.rlib: crates/generated/src/lib.rs /w/t/build/g-1/out/sq.rs

crates/generated/src/lib.rs:
/w/t/build/g-1/out/sq.rs:

# env-dep:OUT_DIR=/w/t/build/g-1/out
# env-dep:GREETING
# env-dep:MULTI=a\\nb
# checksum:blake3=00 file_len:1 crates/generated/src/lib.rs
"""


def test_files_and_env_deps() -> None:
    info = parse(SAMPLE)
    assert info.files == (
        "crates/generated/src/lib.rs",
        "/w/t/build/g-1/out/sq.rs",
    )
    assert info.env == (
        ("GREETING", None),
        ("MULTI", "a\\nb"),
        ("OUT_DIR", "/w/t/build/g-1/out"),
    )


def test_escaped_spaces_in_paths() -> None:
    info = parse("out.d: src/my\\ file.rs src/b.rs\n\nsrc/my\\ file.rs:\nsrc/b.rs:\n")
    assert info.files == ("src/my file.rs", "src/b.rs")


def test_empty_document() -> None:
    info = parse("")
    assert info.files == () and info.env == ()
