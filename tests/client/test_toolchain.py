"""Toolchain facts are computed once per compiler: by one of the calls that start together,
and once for "no --target" and "--target <host>" alike."""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from larder.client import toolchain

HOST = "x86_64-unknown-linux-gnu"


@pytest.fixture
def rustc(tmp_path: Path) -> Path:
    """A fake rustc that appends each invocation to ``calls`` beside it, with a sysroot."""
    sysroot = tmp_path / "sysroot"
    for target, name in ((HOST, "libstd-1.rlib"), ("wasm32-unknown-unknown", "libstd-2.rlib")):
        lib = sysroot / "lib" / "rustlib" / target / "lib"
        lib.mkdir(parents=True)
        (lib / name).write_bytes(name.encode() * 100)
    script = tmp_path / "rustc"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {tmp_path}/calls\n'
        f'case "$1" in -vV) printf "rustc 1.95.0\\nhost: {HOST}\\nrelease: 1.95.0\\n";;\n'
        f"  --print) echo {sysroot};; *) exit 3;; esac\n"
    )
    script.chmod(0o755)
    return script


def calls(rustc: Path) -> list[str]:
    log = rustc.parent / "calls"
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("first", [None, HOST])
def test_the_host_named_or_not_is_computed_once(
    rustc: Path, tmp_path: Path, first: str | None
) -> None:
    state = tmp_path / "state"
    second = HOST if first is None else None
    one = toolchain.fingerprint(str(rustc), first, {}, state)
    assert sorted(calls(rustc)) == ["--print sysroot", "-vV"]
    two = toolchain.fingerprint(str(rustc), second, {}, state)
    assert len(calls(rustc)) == 2  # the same facts, not asked again
    assert one == two and [name for name, _ in one.libraries] == ["libstd-1.rlib"]

    cross = toolchain.fingerprint(str(rustc), "wasm32-unknown-unknown", {}, state)
    assert len(calls(rustc)) == 4
    assert [name for name, _ in cross.libraries] == ["libstd-2.rlib"]


def test_a_rustc_that_fails_gives_no_facts(rustc: Path, tmp_path: Path) -> None:
    rustc.write_text("#!/bin/sh\nexit 1\n")
    with pytest.raises(OSError, match="exited with 1"):
        toolchain.fingerprint(str(rustc), None, {}, tmp_path / "state")
    assert not (tmp_path / "state" / "toolchains.json").exists()


def test_calls_that_start_together_compute_once(tmp_path: Path) -> None:
    computed: list[int] = []
    results: list[dict[str, Any]] = []

    def compute() -> dict[str, Any]:
        computed.append(1)
        time.sleep(0.3)
        return {"facts": len(computed)}

    def call() -> None:
        results.append(toolchain.cached(tmp_path, "facts.json", "rustc|", compute))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert computed == [1]
    assert results == [{"facts": 1}] * 4


def test_a_lock_held_too_long_is_not_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(toolchain, "LOCK_WAIT", 0.2)
    fd = os.open(tmp_path / "facts.json.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a call that hangs while computing
    try:
        start = time.monotonic()
        entry = toolchain.cached(tmp_path, "facts.json", "rustc|", lambda: {"facts": 1})
        waited = time.monotonic() - start
    finally:
        os.close(fd)
    assert entry == {"facts": 1} and 0.2 <= waited < 5
    assert toolchain.cached(tmp_path, "facts.json", "rustc|", lambda: {"facts": 2}) == entry


def test_the_sysroots_compiler_and_rustups_proxy_are_no_wrappers(
    rustc: Path, tmp_path: Path
) -> None:
    sysroot = tmp_path / "sysroot"
    real = sysroot / "bin" / "rustc"
    real.parent.mkdir(parents=True)
    real.write_bytes(b"\x7fELF the compiler")
    assert toolchain.wrapper_line(str(real), str(sysroot)) == ""
    proxies = tmp_path / "cargo-home" / "bin"
    proxies.mkdir(parents=True)
    (proxies / "rustup").write_bytes(b"\x7fELF rustup")
    os.link(proxies / "rustup", proxies / "rustc")
    assert toolchain.wrapper_line(str(proxies / "rustc"), str(sysroot)) == ""
    wrapper = tmp_path / "wrapper"
    wrapper.write_text(f'#!/bin/sh\nexec {real} "$@"\n')
    assert toolchain.wrapper_line(str(wrapper), str(sysroot)).startswith("rustc-wrapper-blake3: ")
    # A sysroot whose own bin/rustc is a script adding flags (-C overflow-checks=off gave a
    # laptop on the plain compiler binaries that did not panic where its own did).
    scripted = tmp_path / "scripted"
    (scripted / "bin").mkdir(parents=True)
    (scripted / "bin" / "rustc").write_text(f'#!/bin/sh\nexec {real} -C overflow-checks=off "$@"\n')
    line = toolchain.wrapper_line(str(scripted / "bin" / "rustc"), str(scripted))
    assert line.startswith("rustc-wrapper-blake3: ")


def test_native_cpu_facts_are_kept_per_machine(
    rustc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A state directory restored on another machine does not reuse this CPU's features."""
    features = tmp_path / "features"
    rustc.write_text(
        f'#!/bin/sh\necho "$*" >> {tmp_path}/calls\necho "target_os=\\"linux\\""\ncat {features}\n'
    )
    state = tmp_path / "state"
    features.write_text('target_feature="avx512f"\ntarget_feature="sse2"\n')
    monkeypatch.setattr(toolchain, "_host_cpu", lambda: "cpu-a")
    here = toolchain.native_cpu(str(rustc), None, {}, state)
    assert here == 'target-cpu-native: target_feature="avx512f",target_feature="sse2"\n'
    assert toolchain.native_cpu(str(rustc), None, {}, state) == here
    assert calls(rustc) == ["--print cfg -C target-cpu=native"]  # once per machine
    features.write_text('target_feature="sse2"\n')
    monkeypatch.setattr(toolchain, "_host_cpu", lambda: "cpu-b")
    assert toolchain.native_cpu(str(rustc), None, {}, state) == (
        'target-cpu-native: target_feature="sse2"\n'
    )


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="Linux describes its CPU")
def test_this_machines_cpu_is_described() -> None:
    described = toolchain._host_cpu()
    assert described is not None and len(described) == 64


def test_a_toolchain_rustup_updated_is_another_compiler(tmp_path: Path) -> None:
    """rustup's proxy is the same file after ``rustup update``: the facts kept for it must
    follow the toolchain's own compiler."""
    from larder.client.toolchain import _rustc_identity

    proxy = tmp_path / "cargo-bin" / "rustc"
    proxy.parent.mkdir()
    proxy.write_text("#!/bin/sh\n")
    compiler = tmp_path / "rustup" / "toolchains" / "nightly-x" / "bin" / "rustc"
    compiler.parent.mkdir(parents=True)
    compiler.write_text("old")
    environ = {"RUSTUP_TOOLCHAIN": "nightly-x", "RUSTUP_HOME": str(tmp_path / "rustup")}
    before = _rustc_identity(str(proxy), environ)
    compiler.unlink()
    compiler.write_text("the new one")  # what an update leaves: another file
    assert _rustc_identity(str(proxy), environ) != before
    assert _rustc_identity(str(proxy), {**environ, "RUSTUP_TOOLCHAIN": "gone"}).endswith("|gone")


def test_rustups_proxy_without_a_toolchain_is_known_by_what_it_chooses_by(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cargo not started through rustup runs rustup's proxy with no ``RUSTUP_TOOLCHAIN``;
    the proxy picks the toolchain from a ``rust-toolchain.toml`` or rustup's settings. Facts
    kept for the proxy alone stayed stable's after the file said nightly: nightly's outputs
    went up under stable's key, and a stable laptop hit them (E0514)."""
    from larder.client.toolchain import _rustc_identity

    bin_dir = tmp_path / "cargo-home" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "rustup").write_bytes(b"\x7fELF rustup")
    os.link(bin_dir / "rustup", bin_dir / "rustc")
    home = tmp_path / "rustup"
    home.mkdir()
    (home / "settings.toml").write_text('default_toolchain = "stable"\n')
    workspace = tmp_path / "work" / "app"
    (workspace / "crates" / "a").mkdir(parents=True)
    monkeypatch.chdir(workspace / "crates" / "a")
    environ = {"RUSTUP_HOME": str(home)}
    proxy = str(bin_dir / "rustc")
    seen = {_rustc_identity(proxy, environ)}
    (workspace / "rust-toolchain.toml").write_text('[toolchain]\nchannel = "nightly"\n')
    seen.add(_rustc_identity(proxy, environ))
    (workspace / "rust-toolchain.toml").write_text('[toolchain]\nchannel = "stable"\n')
    seen.add(_rustc_identity(proxy, environ))
    (home / "settings.toml").write_text('default_toolchain = "nightly"\n')
    seen.add(_rustc_identity(proxy, environ))
    assert len(seen) == 4
    assert _rustc_identity(proxy, environ) == _rustc_identity(proxy, environ)
    # A directory override (`rustup override set`) applies below its directory only: the
    # settings' content is the same everywhere, the toolchain chosen is not.
    (home / "settings.toml").write_text(
        f'default_toolchain = "stable"\n[overrides]\n"{workspace / "crates"}" = "nightly"\n'
    )
    overridden = _rustc_identity(proxy, environ)  # in crates/a
    monkeypatch.chdir(workspace)
    assert _rustc_identity(proxy, environ) != overridden
    monkeypatch.chdir(workspace / "crates" / "a")
    (home / "settings.toml").write_text('default_toolchain = "nightly"\n')
    # `rustup update` changes no setting, only the compiler a toolchain name runs.
    compiler = home / "toolchains" / "stable-x" / "bin" / "rustc"
    compiler.parent.mkdir(parents=True)
    compiler.write_text("1.95")
    before = _rustc_identity(proxy, environ)
    compiler.unlink()
    compiler.write_text("1.96, updated")
    assert _rustc_identity(proxy, environ) != before
    # Another checkout with the same toolchain file: the same facts (an entry per checkout
    # grew toolchains.json on runners with a directory per job).
    other = tmp_path / "elsewhere" / "app"
    other.mkdir(parents=True)
    (other / "rust-toolchain.toml").write_bytes((workspace / "rust-toolchain.toml").read_bytes())
    here = _rustc_identity(proxy, environ)
    monkeypatch.chdir(other)
    assert _rustc_identity(proxy, environ) == here
    # With RUSTUP_TOOLCHAIN (cargo run through rustup) the toolchain's own compiler decides,
    # and a compiler that is not the proxy is known by itself.
    chosen = {**environ, "RUSTUP_TOOLCHAIN": "stable-x"}
    assert "rustup:" not in _rustc_identity(proxy, chosen)
    plain = tmp_path / "rustc"
    plain.write_text("#!/bin/sh\n")
    assert "rustup:" not in _rustc_identity(str(plain), environ)


def test_facts_computed_while_their_identity_changed_are_used_not_kept(tmp_path: Path) -> None:
    """A toolchain file edited between reading the identity and running ``rustc -vV`` gave
    the new toolchain's facts under the old one's identity, kept for every later call."""
    computed: list[int] = []

    def compute() -> dict[str, object]:
        computed.append(1)
        return {"version": f"v{len(computed)}"}

    changed = toolchain.cached(tmp_path, "t.json", "old", compute, still=lambda: False)
    assert changed == {"version": "v1"}
    assert toolchain.cached(tmp_path, "t.json", "old", compute, still=lambda: True) == {
        "version": "v2"
    }  # computed again: nothing was kept
    assert toolchain.cached(tmp_path, "t.json", "old", compute) == {"version": "v2"}
    assert len(computed) == 2


def test_a_facts_file_keeps_the_newest_entries_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every toolchain update adds entries, and the file is read on every rustc call."""
    monkeypatch.setattr(toolchain, "MAX_KEPT", 4)
    for n in range(10):
        toolchain.cached(tmp_path, "t.json", f"id{n}", lambda n=n: {"n": n})
    kept = json.loads((tmp_path / "t.json").read_text())
    assert list(kept) == ["id6", "id7", "id8", "id9"]


def test_facts_are_used_when_the_state_directory_cannot_keep_them(tmp_path: Path) -> None:
    """A read-only or impossible state directory (``~/.cache`` not writable for a CI user)
    made every compilation non-cacheable (no key): the facts must be computed and used."""
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    computed = []

    def compute() -> dict[str, Any]:
        computed.append(1)
        return {"release": "1.95.0"}

    for _ in range(2):
        assert toolchain.cached(blocked / "state", "toolchains.json", "id", compute) == {
            "release": "1.95.0"
        }
    assert len(computed) == 2  # not kept: computed again, never an error
