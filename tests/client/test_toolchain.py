"""Toolchain facts are computed once per compiler: by one of the calls that start together,
and once for "no --target" and "--target <host>" alike."""

from __future__ import annotations

import fcntl
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
