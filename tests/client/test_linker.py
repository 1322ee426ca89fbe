"""Key item 11 with the machine's real C compiler driver: each link input changes it."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from larder.client import toolchain
from larder.client.digests import file_digest
from larder.client.key import KeyUnavailable
from larder.client.linker import Link, script_references, search_dirs
from larder.client.linkline import classify
from larder.client.paths import Roots
from tests.client.changes import Changes

HOST = "x86_64-unknown-linux-gnu"
VERSION = f"rustc 1.95.0 (59807616e 2026-04-14)\nhost: {HOST}\nrelease: 1.95.0\n"
GCC_LD = f"@LARDER:SYSROOT@/lib/rustlib/{HOST}/bin/gcc-ld"
STD = f"lib/rustlib/{HOST}/lib/libstd-d123.rlib"
# A binary's link line as a direct entry records it (see test_linkline for the normalising).
TOKENS = [
    "cc", "-m64", "@LARDER:RUSTC_TMP@/symbols.o", "-Wl,--as-needed", "-Wl,-Bstatic",
    "@LARDER:TARGET@/debug/deps/libleaf-1.rlib", f"@LARDER:SYSROOT@/{STD}", "-Wl,-Bdynamic",
    "-lgcc_s", "-lc", "-Wl,-Bstatic", "-lanswer", "-Wl,-Bdynamic", "-L",
    "@LARDER:RUSTC_TMP@/raw-dylibs", "-L", "@LARDER:TARGET@/debug/build/first/out", "-L",
    "@LARDER:TARGET@/debug/build/native-1/out", f"-B{GCC_LD}", "-fuse-ld=lld",
    "-Wl,--eh-frame-hdr", "-Wl,-z,relro,-z,now", "-pie", "-nodefaultlibs",
]  # fmt: skip


@dataclass
class Machine:
    """A checkout with a target directory, a toolchain and a state directory somewhere."""

    base: Path

    @property
    def cwd(self) -> Path:
        return self.base / "src" / "app"

    @property
    def target(self) -> Path:
        return self.base / "target"

    @property
    def sysroot(self) -> Path:
        return self.base / "rustup" / "toolchains" / "stable"

    @property
    def native(self) -> Path:
        return self.target / "debug" / "build" / "native-1" / "out"

    def setup(self) -> Machine:
        self.cwd.mkdir(parents=True)
        (self.target / "debug" / "deps").mkdir(parents=True)
        (self.target / "debug" / "deps" / "libleaf-1.rlib").write_bytes(b"!<arch>\nleaf v1")
        (self.target / "debug" / "build" / "first" / "out").mkdir(parents=True)
        self.native.mkdir(parents=True)
        (self.native / "libanswer.a").write_bytes(b"!<arch>\nanswer 42")
        (self.sysroot / STD).parent.mkdir(parents=True)
        (self.sysroot / STD).write_bytes(b"!<arch>\nstd")
        lld = self.sysroot / f"lib/rustlib/{HOST}/bin/gcc-ld/ld.lld"
        lld.parent.mkdir(parents=True)
        lld.write_text("#!/bin/sh\nexit 1\n")
        lld.chmod(0o755)
        return self

    def item(self, tokens: list[str] | None = None, **env: str) -> dict[str, object]:
        tokens = tokens or TOKENS
        roots = Roots.of(CWD=self.cwd, TARGET=self.target, SYSROOT=self.sysroot)
        fingerprint = toolchain.Fingerprint(VERSION, str(self.sysroot), [])
        covered = {
            STD: file_digest(self.sysroot / STD),
            f"lib/rustlib/{HOST}/bin/gcc-ld/ld.lld": "11" * 32,
        }
        environ = {"PATH": os.environ["PATH"], **env}
        link = Link(
            roots=roots, cwd=self.cwd, environ=environ, state_dir=self.base / "state",
            fingerprint=fingerprint, covered=covered,
        )  # fmt: skip
        return link.item(tokens, classify(tokens))


@pytest.fixture
def ci(tmp_path: Path) -> Machine:
    return Machine(tmp_path / "ci").setup()


@pytest.fixture
def laptop(tmp_path: Path) -> Machine:
    return Machine(tmp_path / "home" / "me" / "elsewhere").setup()


def fake_driver(directory: Path, version: str, log: Path | None = None) -> Path:
    """A ``cc`` wrapper: ``--version`` answers what ``version`` holds (a wrapper's answer
    changes with what it wraps), everything else goes to the real driver."""
    real = shutil.which("cc")
    assert real is not None, "a C compiler driver (cc) must be on PATH"
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "cc"
    (directory / "version").write_text(version + "\n")
    record = f'echo "$@" >> {log}\n' if log else ""
    script.write_text(
        f'#!/bin/sh\n{record}if [ "$1" = --version ]; then cat "{directory}/version"; exit 0; fi\n'
        f'exec {real} "$@"\n'
    )
    script.chmod(0o755)
    return script


def test_same_inputs_elsewhere_give_the_same_item(ci: Machine, laptop: Machine) -> None:
    item = ci.item()
    assert item == laptop.item()
    text = repr(item)
    for machine in (ci, laptop):
        assert str(machine.base) not in text
    inputs = [entry[0] for entry in item["inputs"]]  # type: ignore[attr-defined]
    assert "@LARDER:TARGET@/debug/deps/libleaf-1.rlib" in inputs
    assert "@LARDER:TARGET@/debug/build/native-1/out/libanswer.a" in inputs
    assert f"@LARDER:SYSROOT@/{STD}" in inputs
    assert not any("RUSTC_TMP" in name for name in inputs)  # products, not inputs
    assert any(name.endswith("libc.so.6") for name in inputs)  # through the libc.so script
    assert "crti.o" in inputs and f"{GCC_LD}/ld.lld" in inputs
    linker = item["linker"]
    assert isinstance(linker, dict) and linker["driver"].startswith("cc ")


change = Changes[Machine]()


@change("native library content on a -L path")
def _native(m: Machine) -> dict[str, object]:
    (m.native / "libanswer.a").write_bytes(b"!<arch>\nanswer 43")
    return {}


@change("a library in an earlier -L directory")
def _shadowed(m: Machine) -> dict[str, object]:
    (m.target / "debug/build/first/out/libanswer.a").write_bytes(b"!<arch>\nanswer 42")
    return {}


@change("a shared library beside a static one (dynamic mode)")
def _shared(m: Machine) -> dict[str, object]:
    (m.native / "libgcc_s.so").write_bytes(b"\x7fELF fake")
    return {}


@change("a dependency's rlib on the link line")
def _rlib(m: Machine) -> dict[str, object]:
    (m.target / "debug/deps/libleaf-1.rlib").write_bytes(b"!<arch>\nleaf v2")
    return {}


@change("link-arg")
def _link_arg(m: Machine) -> dict[str, object]:
    return {"tokens": [*TOKENS, "-Wl,--build-id=sha1"]}


@change("crate type (shared object)")
def _shared_object(m: Machine) -> dict[str, object]:
    return {"tokens": [t for t in TOKENS if t != "-pie"] + ["-shared"]}


@change("static linking")
def _static(m: Machine) -> dict[str, object]:
    return {"tokens": [t for t in TOKENS if t != "-pie"] + ["-static-pie"]}


@change("a different cc first on PATH")
def _path(m: Machine) -> dict[str, object]:
    fake_driver(m.base / "bin", "cc (Debian 12.2.0-14+deb12u1) 12.2.0")
    return {"env": {"PATH": f"{m.base / 'bin'}:{os.environ['PATH']}"}}


@change("LIBRARY_PATH")
def _library_path(m: Machine) -> dict[str, object]:
    (m.base / "libs").mkdir()
    return {"env": {"LIBRARY_PATH": str(m.base / "libs")}}


@change("the sysroot's standard library")
def _std(m: Machine) -> dict[str, object]:
    (m.sysroot / STD).write_bytes(b"!<arch>\nstd, patched")
    return {}


@pytest.mark.parametrize("name", change.names())
def test_each_link_input_changes_the_item(name: str, ci: Machine) -> None:
    before = Machine(ci.base.parent / "pristine").setup().item()
    options = change.by_name[name](ci)
    tokens = options.get("tokens")
    assert tokens is None or isinstance(tokens, list)
    after = ci.item(tokens, **options.get("env", {}))  # type: ignore[arg-type]
    assert before != after, name


def test_linker_version_changes_the_item(ci: Machine) -> None:
    """The same driver binary (-C linker=) answering another version: a toolchain update
    behind a wrapper script."""
    script = fake_driver(ci.base / "tools", "fakecc 1.0")
    tokens = [str(script), *TOKENS[1:]]
    before = ci.item(tokens)
    assert before["linker"]["driver"] == "fakecc 1.0"  # type: ignore[index]
    (ci.base / "tools" / "version").write_text("fakecc 2.0\n")
    after = ci.item(tokens)
    assert after["linker"]["driver"] == "fakecc 2.0"  # type: ignore[index]
    assert {k: v for k, v in after.items() if k != "linker"} == {
        k: v for k, v in before.items() if k != "linker"
    }


def test_linker_scripts_are_followed(ci: Machine) -> None:
    (ci.native / "libanswer.a").unlink()
    (ci.native / "libanswer.so").write_text("/* GNU ld script */\nGROUP ( libanswer_impl.a )\n")
    (ci.native / "libanswer_impl.a").write_bytes(b"!<arch>\nimpl 1")
    tokens = [t if t != "-lanswer" else "-Wl,-Bdynamic,-lanswer" for t in TOKENS]
    first = ci.item(tokens)
    assert "@LARDER:TARGET@/debug/build/native-1/out/libanswer_impl.a" in repr(first)
    (ci.native / "libanswer_impl.a").write_bytes(b"!<arch>\nimpl 2")
    assert ci.item(tokens) != first

    # A -T script and what it INCLUDEs from a -L directory.
    (ci.native / "link.x").write_text("INCLUDE memory.x\nSECTIONS { }\n")
    (ci.native / "memory.x").write_text("MEMORY { FLASH : ORIGIN = 0, LENGTH = 64K }\n")
    scripted = [*tokens, "-Tlink.x"]
    with_script = ci.item(scripted)
    (ci.native / "memory.x").write_text("MEMORY { FLASH : ORIGIN = 0, LENGTH = 128K }\n")
    assert ci.item(scripted) != with_script


def test_what_cannot_be_found_gives_no_key(ci: Machine) -> None:
    (ci.native / "libanswer.a").unlink()
    with pytest.raises(KeyUnavailable, match="-lanswer"):
        ci.item()
    with pytest.raises(KeyUnavailable, match="not found"):
        ci.item([*TOKENS, "-Tnowhere.x"])
    with pytest.raises(KeyUnavailable, match="linker"):
        ci.item(["no-such-linker-anywhere", *TOKENS[1:]])


def test_driver_facts_are_asked_once_per_binary(ci: Machine) -> None:
    log = ci.base / "driver-calls"
    script = fake_driver(ci.base / "tools", "fakecc 1.0", log)
    tokens = [str(script), *TOKENS[1:]]
    first = ci.item(tokens)
    calls = log.read_text().splitlines()
    assert len(calls) == 3  # --version, -print-search-dirs, -print-prog-name
    assert ci.item(tokens) == first
    assert log.read_text().splitlines()[3:] == ["--version"]  # the rest was remembered
    script.write_text(script.read_text() + "# replaced\n")  # another binary: asked again
    assert ci.item(tokens) != first
    assert len(log.read_text().splitlines()) == 7


def test_a_damaged_linker_cache_gives_no_key(ci: Machine) -> None:
    ci.item()
    cache = ci.base / "state" / "linkers.json"
    entries = json.loads(cache.read_text())
    cache.write_text(json.dumps({k: {**v, "search": "/usr/lib"} for k, v in entries.items()}))
    with pytest.raises(KeyUnavailable, match="malformed"):
        ci.item()


def test_search_dirs_and_script_references(tmp_path: Path) -> None:
    text = "install: /usr/lib/gcc/x/12/\nlibraries: =/usr/lib/gcc/x/12/:/usr/lib/../lib/:/lib/\n"
    assert search_dirs(text) == ["/usr/lib/gcc/x/12", "/usr/lib", "/lib"]
    script = tmp_path / "libc.so"
    script.write_text(
        "/* GNU ld script */\nOUTPUT_FORMAT(elf64-x86-64)\nGROUP ( /lib/libc.so.6 "
        "/usr/lib/libc_nonshared.a  AS_NEEDED ( /lib64/ld-linux-x86-64.so.2 ) -lgcc )\n"
    )
    assert script_references(script) == [
        "/lib/libc.so.6", "/usr/lib/libc_nonshared.a", "/lib64/ld-linux-x86-64.so.2", "-lgcc",
    ]  # fmt: skip
    elf = tmp_path / "libx.so"
    elf.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(100))
    assert script_references(elf) is None
    searching = tmp_path / "libs.so"
    searching.write_text("SEARCH_DIR(/opt/lib)\nINPUT(-lz)\n")
    with pytest.raises(KeyUnavailable, match="search directories"):
        script_references(searching)
