"""What identifies the compiler: ``rustc -vV`` and the standard library it links against.

Both are computed once per rustc binary (path, size, mtime, and ``RUSTUP_TOOLCHAIN`` in case the
binary is a rustup proxy) and kept in ``toolchains.json`` in the shim's state directory, so an
invocation normally pays for neither.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

from larder.client.key import file_digest


class Toolchain(NamedTuple):
    version: str  # rustc -vV
    sysroot: str
    host: str

    def libraries(self, target: str | None) -> list[tuple[str, str]]:
        """Name and BLAKE3 of each file in the target's ``lib`` directory of the sysroot."""
        directory = Path(self.sysroot, "lib", "rustlib", target or self.host, "lib")
        if not directory.is_dir():
            return []
        return [(p.name, file_digest(p)) for p in sorted(directory.iterdir()) if p.is_file()]


def _run(rustc: str, *args: str) -> str:
    import subprocess  # only when the toolchain is not cached yet

    done = subprocess.run(
        [rustc, *args], capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL
    )
    return done.stdout


def _identity(rustc: str, environ: dict[str, str]) -> str:
    stat = os.stat(rustc)
    return f"{os.path.realpath(rustc)}|{stat.st_size}|{stat.st_mtime_ns}|" + environ.get(
        "RUSTUP_TOOLCHAIN", ""
    )


def resolve(rustc: str, environ: dict[str, str]) -> str:
    """The rustc executable cargo named (a bare name is looked up on PATH)."""
    if os.sep in rustc:
        return rustc
    for directory in environ.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(directory or ".", rustc)
        if os.access(candidate, os.X_OK) and os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"{rustc} not found on PATH")


def fingerprint(
    rustc: str, target: str | None, environ: dict[str, str], state_dir: Path
) -> tuple[str, list[tuple[str, str]]]:
    """``(rustc -vV, sysroot libraries)`` for key items 2 and 3, cached in ``state_dir``."""
    path = resolve(rustc, environ)
    identity = f"{_identity(path, environ)}|{target or ''}"
    cache_file = state_dir / "toolchains.json"
    try:
        known = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(identity) if isinstance(known, dict) else None
    if isinstance(entry, dict) and "version" in entry and "libraries" in entry:
        return str(entry["version"]), [(str(n), str(h)) for n, h in entry["libraries"]]
    version = _run(path, "-vV")
    host = next((line.split(":", 1)[1].strip() for line in version.splitlines()
                 if line.startswith("host:")), "")  # fmt: skip
    toolchain = Toolchain(version, _run(path, "--print", "sysroot").strip(), host)
    libraries = toolchain.libraries(target)
    known = known if isinstance(known, dict) else {}
    known[identity] = {"version": version, "libraries": libraries}
    state_dir.mkdir(parents=True, exist_ok=True)
    scratch = cache_file.with_name(f".toolchains-{os.getpid()}.json")
    scratch.write_text(json.dumps(known))
    os.replace(scratch, cache_file)
    return version, libraries
