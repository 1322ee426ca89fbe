"""Reading rustc command lines: forms of flags, compilations, cacheability, outputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from larder.client.args import parse, split

CARGO_LIB = [
    "--crate-name", "leaf", "--edition=2021", "crates/leaf/src/lib.rs", "--error-format=json",
    "--json=diagnostic-rendered-ansi,artifacts,future-incompat", "--crate-type", "lib",
    "--emit=dep-info,metadata,link", "-C", "embed-bitcode=no", "-C", "debuginfo=2",
    "--cfg", 'feature="default"', "-C", "metadata=0d7b9f46af7681ca",
    "-C", "extra-filename=-0d7b9f46af7681ca", "--out-dir", "/w/target/debug/deps",
    "-L", "dependency=/w/target/debug/deps",
    "--extern", "itoa=/w/target/debug/deps/libitoa-1.rmeta",
]  # fmt: skip


def test_flag_forms() -> None:
    flags, positional = split(
        ["-Copt-level=3", "-C", "debuginfo=0", "--cfg=x", "--cfg", "y", "-lstatic=z", "-O",
         "--test", "src/main.rs", "-"]
    )  # fmt: skip
    assert flags == [
        ("-C", "opt-level=3"), ("-C", "debuginfo=0"), ("--cfg", "x"), ("--cfg", "y"),
        ("-l", "static=z"), ("-O", None), ("--test", None),
    ]  # fmt: skip
    assert positional == ["src/main.rs", "-"]


def test_cargo_lib_compilation_is_cacheable() -> None:
    c = parse(CARGO_LIB)
    assert c.is_compilation and c.cacheable and c.reason is None
    assert c.crate_name == "leaf" and c.crate_types == ["lib"]
    assert c.out_dir == Path("/w/target/debug/deps")
    assert c.expected_outputs() == [
        "leaf-0d7b9f46af7681ca.d",
        "libleaf-0d7b9f46af7681ca.rlib",
        "libleaf-0d7b9f46af7681ca.rmeta",
    ]
    assert c.values("--extern") == ["itoa=/w/target/debug/deps/libitoa-1.rmeta"]


def test_argv_round_trips() -> None:
    c = parse(CARGO_LIB)
    again = parse(c.argv())
    assert again.flags == c.flags and again.input == c.input
    assert "--out-dir" not in c.argv(without=frozenset({"--out-dir"}))


@pytest.mark.parametrize(
    "argv",
    [["-vV"], ["--version"], ["-", "--crate-name", "___", "--print=file-names"],
     ["--print", "sysroot"], ["--explain", "E0308"], []],
)  # fmt: skip
def test_not_compilations(argv: list[str]) -> None:
    assert not parse(argv).is_compilation


def _with(*extra: str, drop: str | None = None) -> list[str]:
    argv = list(CARGO_LIB)
    if drop is not None:
        i = argv.index(drop)
        del argv[i : i + (1 if "=" in drop else 2)]
    return argv + list(extra)


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (_with(drop="--crate-type"), "crate-type:unspecified"),
        (_with("--crate-type", "sdylib", drop="--crate-type"), "crate-type:sdylib"),
        (_with("-C", "incremental=/w/target/debug/incremental"), "incremental"),
        (_with("--test"), "test"),
        (_with("--test", drop="--crate-type"), "test"),  # as cargo passes it
        (_with("--emit=asm"), "emit:asm"),
        (_with("--emit=link=/tmp/x.rlib"), "emit-path"),
        (_with("-o", "/tmp/x"), "output-file"),
        (_with(drop="--out-dir"), "no-out-dir"),
        (_with("@/tmp/args"), "argfile"),
        (_with("-C", "split-debuginfo=unpacked"), "split-debuginfo"),
        (_with("-C", "profile-use=/tmp/p.profdata"), "codegen-option"),
        # rustc's other spellings of a codegen option
        (_with("--codegen", "split-debuginfo=packed"), "split-debuginfo"),
        (_with("--codegen=split-debuginfo=packed"), "split-debuginfo"),
        (_with("-Csplit_debuginfo=packed"), "split-debuginfo"),
        (_with("-C", "save_temps"), "codegen-option"),
        (_with("--codegen", "profile_generate=/tmp/p"), "codegen-option"),
        (_with("-Cincremental=/w/target/debug/incremental"), "incremental"),
        (_with("--sysroot", "/opt/custom-sysroot"), "sysroot"),
        (_with("--sysroot=sysroot"), "sysroot"),
        (_with(drop="--crate-name"), "no-crate-name"),
        (_with("--crate-name=", drop="--crate-name"), "no-crate-name"),  # found by fuzz.client_args
        (_with("other.rs"), "inputs"),
        (_with("--cfg"), "missing-value"),
        # rustc then writes the real paths beside the remapped ones into the crate metadata
        (_with("--remap-path-scope=object"), "remap-path-scope"),
        (_with("--remap-path-scope", "macro,diagnostics,debuginfo,coverage"), "remap-path-scope"),
        (_with("-Z", "remap-path-scope=object"), "remap-path-scope"),
        # the key knows a -Z option's text only, not the file it reads
        (_with("-Z", "profile-sample-use=prof.txt"), "unstable-option-file"),
        (_with("-Zllvm_plugins=plugin.so"), "unstable-option-file"),
        (
            _with("-Z", "codegen-backend=/opt/backends/librustc_codegen_x.so"),
            "unstable-option-file",
        ),
    ],
)
def test_non_cacheable_reasons(argv: list[str], reason: str) -> None:
    assert parse(argv).reason == reason


@pytest.mark.parametrize(
    "argv",
    [
        _with("--remap-path-scope=all"),
        _with("--remap-path-scope=object", "--remap-path-scope=diagnostics,documentation"),
        # no crate metadata: a binary, staticlib or cdylib stays portable under `object`
        _with("--remap-path-scope=object", "--crate-type", "bin", drop="--crate-type"),
        _with("--remap-path-scope=object", "--crate-type=staticlib", drop="--crate-type"),
        _with("--remap-path-scope=object", "--crate-type", "cdylib", drop="--crate-type"),
    ],
)
def test_a_remap_path_scope_that_keeps_outputs_portable_is_cacheable(argv: list[str]) -> None:
    assert parse(argv).reason is None


@pytest.mark.parametrize(
    ("root", "extra", "reason", "types"),
    [
        ("fn main() {}\n", [], None, ["bin"]),  # cargo's harness = false bench or test
        ('#![crate_type = "lib"]\npub fn f() {}\n', [], "crate-type:unspecified", []),
        ('#![cfg_attr(x, crate_type = "rlib")]\nfn main() {}\n', [], "crate-type:unspecified", []),
        ("fn main() {}\n", ["--crate-attr", "crate_type=lib"], "crate-type:unspecified", []),
        ("fn main() {}\n", ["-Z", "crate-attr=crate_type=lib"], "crate-type:unspecified", []),
        ("fn main() {}\n", ["--test"], "test", []),
    ],
)
def test_no_crate_type_is_a_binary_unless_the_crate_root_says_otherwise(
    tmp_path: Path, root: str, extra: list[str], reason: str | None, types: list[str]
) -> None:
    source = tmp_path / "benches" / "speed.rs"
    source.parent.mkdir()
    source.write_text(root)
    argv = [
        a if a != "crates/leaf/src/lib.rs" else str(source)
        for a in _with(*extra, drop="--crate-type")
    ]
    c = parse(argv)
    assert (c.reason, c.crate_types) == (reason, types)
    if reason is None:
        assert c.linked and c.expected_outputs() == [
            "leaf-0d7b9f46af7681ca", "leaf-0d7b9f46af7681ca.d", "libleaf-0d7b9f46af7681ca.rmeta"
        ]  # fmt: skip
    source.unlink()  # unreadable: rustc will say why; nothing is assumed
    assert parse(argv).reason in ("crate-type:unspecified", "test")
    os.mkfifo(source)  # never opened: reading it would take what rustc must read
    assert parse(argv).reason in ("crate-type:unspecified", "test")


def test_unstable_options_without_a_file_stay_cacheable() -> None:
    assert parse(
        _with("-Z", "threads=8", "-Zshare-generics=y", "-Zcodegen-backend=cranelift")
    ).cacheable


def test_codegen_options_read_as_rustc_reads_them() -> None:
    spelled = parse(_with("--codegen=target_cpu=native", "-Clink_arg=-Wl,-z,now"))
    assert spelled.codegen()["target-cpu"] == "native"
    assert spelled.values("-C")[-1] == "link-arg=-Wl,-z,now"
    assert (
        spelled.codegen()
        == parse(_with("-C", "target-cpu=native", "-C", "link-arg=-Wl,-z,now")).codegen()
    )


def test_staticlib_and_check_outputs() -> None:
    static = parse(_with("--crate-type", "staticlib", drop="--crate-type"))
    assert static.cacheable
    assert "libleaf-0d7b9f46af7681ca.a" in static.expected_outputs()
    check = parse(_with("--emit=dep-info,metadata", drop="--emit=dep-info,metadata,link"))
    assert check.expected_outputs() == [
        "leaf-0d7b9f46af7681ca.d",
        "libleaf-0d7b9f46af7681ca.rmeta",
    ]


@pytest.mark.parametrize(
    ("crate_type", "output"),
    [("bin", "leaf-0d7b9f46af7681ca"), ("proc-macro", "libleaf-0d7b9f46af7681ca.so"),
     ("cdylib", "libleaf-0d7b9f46af7681ca.so"), ("dylib", "libleaf-0d7b9f46af7681ca.so")],
)  # fmt: skip
def test_linked_crate_types_are_cacheable(crate_type: str, output: str) -> None:
    linked = parse(_with("--crate-type", crate_type, drop="--crate-type"))
    assert linked.cacheable and linked.linked
    assert linked.expected_outputs() == sorted(
        ["leaf-0d7b9f46af7681ca.d", "libleaf-0d7b9f46af7681ca.rmeta", output]
    )


def test_what_links() -> None:
    assert not parse(CARGO_LIB).linked
    assert not parse(_with("--crate-type", "staticlib", drop="--crate-type")).linked
    # `cargo check` of a binary writes metadata only: nothing is linked.
    check = _with("--crate-type", "bin", "--emit=dep-info,metadata", drop="--crate-type")
    check.remove("--emit=dep-info,metadata,link")
    assert parse(check).cacheable and not parse(check).linked
    mixed = parse(_with("--crate-type", "rlib,cdylib", drop="--crate-type"))
    assert mixed.linked
    assert "libleaf-0d7b9f46af7681ca.rlib" in mixed.expected_outputs()
    assert "libleaf-0d7b9f46af7681ca.so" in mixed.expected_outputs()
