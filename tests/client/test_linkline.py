"""Link lines: the same tokens from any machine, every argument read or refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from larder.client import args
from larder.client.linkline import (
    Lib,
    Unaccounted,
    check_compilation,
    classify,
    normalise,
    parse,
    rustc_tmp,
)
from larder.client.paths import Roots

HOST = "x86_64-unknown-linux-gnu"
# What rustc 1.95 writes with --print=link-args for a cargo binary (std rlibs shortened).
LINE = (
    'LC_ALL="C" PATH="{sysroot}/lib/rustlib/{host}/bin:/usr/bin:/bin" VSLANG="1033" "cc" "-m64" '
    '"{deps}/rustcAb12Cd/symbols.o" "{deps}/demo-ef00.demo.e0b4-cgu.0.rcgu.o" '
    '"{deps}/demo-ef00.chb3vtgm.rcgu.o" "-Wl,--as-needed" "-Wl,-Bstatic" '
    '"{deps}/libleaf-dd09.rlib" "{sysroot}/lib/rustlib/{host}/lib/libstd-d123.rlib" '
    '"-Wl,-Bdynamic" "-lgcc_s" "-lc" "-Wl,-Bstatic" "-lanswer" "-Wl,-Bdynamic" '
    '"-L" "{deps}/rustcAb12Cd/raw-dylibs" "-L" "{target}/debug/build/native-1/out" '
    '"-B{sysroot}/lib/rustlib/{host}/bin/gcc-ld" "-fuse-ld=lld" "-Wl,--eh-frame-hdr" '
    '"-Wl,-z,noexecstack" "-L" "{sysroot}/lib/rustlib/{host}/lib" "-o" "{deps}/demo-ef00" '
    '"-Wl,--gc-sections" "-pie" "-Wl,-z,relro,-z,now" "-nodefaultlibs"'
)


def tokens_on(cwd: str, target: str, sysroot: str) -> list[str]:
    deps = f"{target}/debug/deps"
    argv = parse(LINE.format(sysroot=sysroot, host=HOST, deps=deps, target=target))
    tmp = rustc_tmp(argv, [deps])
    assert tmp == f"{deps}/rustcAb12Cd"
    roots = Roots.of(CWD=Path(cwd), TARGET=Path(target), SYSROOT=Path(sysroot), RUSTC_TMP=Path(tmp))
    return normalise(argv, out_dirs=[deps], stem="demo-ef00", portable=roots.portable)


def test_two_machines_give_the_same_tokens() -> None:
    ci = tokens_on("/ci/app", "/ci/app/target", "/opt/rust/toolchains/stable")
    laptop = tokens_on("/home/me/app", "/tmp/t", "/home/me/.rustup/toolchains/stable")
    assert ci == laptop
    assert ci[0] == "cc"
    assert "@LARDER:RUSTC_TMP@/symbols.o" in ci
    assert "@LARDER:TARGET@/debug/deps/libleaf-dd09.rlib" in ci
    assert f"@LARDER:SYSROOT@/lib/rustlib/{HOST}/lib/libstd-d123.rlib" in ci
    # The output, the crate's own objects and rustc's environment are not inputs.
    assert not any("rcgu.o" in t or t == "-o" or t.startswith(("PATH=", "LC_ALL")) for t in ci)
    assert not any("demo-ef00" in t for t in ci)


@pytest.mark.parametrize(
    ("token", "own"),
    [
        ("/t/deps/demo-ef00.demo.e0b4-cgu.0.rcgu.o", True),
        ("/t/deps/demo-ef00..o", True),  # anything between the stem's dot and ".o"
        ("/t2/deps/demo-ef00.x.o", True),  # the other spelling of the out dir
        ("/t/deps/demo-ef00.o", False),  # no dot after the stem
        ("/t/deps/demo-ef00.sub/x.o", False),  # another directory
        ("/t/deps/demo-ef00.x.rlib", False),
        ("/t/deps/demo-ef001.x.o", False),  # another stem
        ("/t/deps/libleaf.o", False),
    ],
)
def test_only_the_crates_own_objects_are_dropped(token: str, own: bool) -> None:
    argv = ["cc", token, "-o", "/t/deps/demo-ef00"]
    kept = normalise(argv, out_dirs=["/t/deps", "/t2/deps/"], stem="demo-ef00", portable=str)
    assert kept == (["cc"] if own else ["cc", token])


def test_classify_reads_files_libraries_and_search_order() -> None:
    plan = classify(tokens_on("/ci/app", "/ci/app/target", "/opt/rust/stable"))
    assert plan.program == "cc"
    assert plan.driver == (
        "-m64",
        f"-B@LARDER:SYSROOT@/lib/rustlib/{HOST}/bin/gcc-ld",
        "-fuse-ld=lld",
    )
    assert plan.libs == (Lib("gcc_s", False), Lib("c", False), Lib("answer", True))
    assert plan.search == (
        "@LARDER:RUSTC_TMP@/raw-dylibs",
        "@LARDER:TARGET@/debug/build/native-1/out",
        f"@LARDER:SYSROOT@/lib/rustlib/{HOST}/lib",
    )
    assert plan.files[0] == "@LARDER:RUSTC_TMP@/symbols.o"
    assert "@LARDER:TARGET@/debug/deps/libleaf-dd09.rlib" in plan.files


def test_linker_arguments_and_search_modes() -> None:
    plan = classify(
        ["cc", "-Wl,--push-state,-Bstatic", "-lz", "-Wl,--pop-state", "-l", "m", "-Xlinker",
         "-Bstatic", "-l:libq.so.1", "-Wl,-soname=libx.so,--version-script=exports.map",
         "-Wl,-T,link.x", "-Tmemory.x", "-Wl,-rpath,$ORIGIN/lib", "-Wl,--build-id=sha1",
         "-Wl,-L,/opt/lib", "main.o"]
    )  # fmt: skip
    assert plan.libs == (Lib("z", True), Lib("m", False), Lib(":libq.so.1", True))
    assert plan.files == ("exports.map", "main.o")
    assert plan.scripts == ("link.x", "memory.x")
    assert plan.search == ("/opt/lib",)
    static = classify(["cc", "-static-pie", "-lc"])
    assert static.libs == (Lib("c", True),)
    # -C instrument-coverage: the driver is asked to pull in the profiler runtime's symbol;
    # it names no file (every linked crate of a coverage build was refused before).
    coverage = classify(["cc", "-u", "__llvm_profile_runtime", "main.o", "-lc"])
    assert coverage.files == ("main.o",) and coverage.libs == (Lib("c", False),)


@pytest.mark.parametrize(
    ("token", "kind"),
    [("-Wl,--plugin=/usr/lib/LLVMgold.so", "linker-plugin"), ("-flto", "linker-plugin"),
     ("-Wl,-plugin-opt=O3", "linker-plugin"), ("-Wl,-Map=out.map", "link-arg"),
     ("@args.rsp", "link-arg"), ("-Wl,@args.rsp", "link-arg"), ("-B/usr/local/bin", "link-arg"),
     ("-fuse-ld=/opt/mold/ld", "link-arg"), ("--sysroot=/opt/sysroot", "link-arg"),
     ("-specs=x.specs", "link-arg"), ("-Wl,-z", "link-arg"), ("-L", "link-arg"),
     ("-u", "link-arg"), ("-undef", "link-arg")],
)  # fmt: skip
def test_what_the_key_cannot_describe_is_refused(token: str, kind: str) -> None:
    with pytest.raises(Unaccounted) as caught:
        classify(["cc", token])
    assert caught.value.kind == kind


def test_a_malformed_link_line_is_refused() -> None:
    for text in ("", 'LC_ALL="C"', '"cc" "unterminated'):
        with pytest.raises(Unaccounted):
            parse(text)


CARGO_BIN = [
    "--crate-name", "demo", "--edition=2021", "crates/demo/src/main.rs", "--crate-type", "bin",
    "--emit=dep-info,link", "-C", "extra-filename=-ef00", "--out-dir", "/w/target/debug/deps",
    "-L", "dependency=/w/target/debug/deps", "-L", "native=crates/demo/ld",
]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ([], None),
        (["-C", "link-arg=-Wl,--gc-sections", "-C", "link-args=-Wl,-O1 -s"], None),
        (["-C", "link-arg=-fuse-ld=mold"], None),
        (["--target", "wasm32-unknown-unknown"], "linked-target"),
        (["--target", "aarch64-apple-darwin"], "linked-target"),
        (["--target", "aarch64-unknown-linux-gnu"], None),
        (["--crate-type", "cdylib"], "crate-types"),
        (["--crate-type", "rlib"], None),
        (["-Z", "threads=8"], "unstable-option"),
        (["-C", "linker-plugin-lto"], "linker-plugin"),
        (["-C", "linker-flavor=ld.lld"], "linker-flavor"),
        (["-C", "rpath"], "rpath"),
        (["-C", "rpath=no"], None),
        (["-l", "link-arg=-Wl,-Map=x"], "native-kind"),
        (["-l", "static:+whole-archive=foo"], None),
        (["-C", "link-arg=-Wl,--wrap-everything"], "link-arg"),
        (["-C", "link-arg=-Wl,--plugin,x.so"], "linker-plugin"),
        (["-C", "link-arg=-Wl,--version-script=missing.map"], "link-arg-file"),
        (["-C", "link-arg=-Wl,--version-script=exports.map"], None),
        (["-C", "link-arg=-Tlink.x"], None),  # found in a -L directory
        (["-C", "link-arg=-Tnowhere.x"], "link-arg-file"),
    ],
)
def test_linked_compilations_are_checked_before_they_run(
    extra: list[str], reason: str | None, tmp_path: Path
) -> None:
    (tmp_path / "exports.map").write_text("{ global: *; };\n")
    (tmp_path / "crates/demo/ld").mkdir(parents=True)
    (tmp_path / "crates/demo/ld/link.x").write_text("INCLUDE memory.x\n")
    compilation = args.parse([*CARGO_BIN, *extra])
    assert compilation.linked
    assert check_compilation(compilation, tmp_path) == reason
