"""What identifies the compiler: ``rustc -vV``, its sysroot and the libraries and tools in it.

Everything here is computed once per rustc binary (path, size, mtime, and ``RUSTUP_TOOLCHAIN``
in case the binary is a rustup proxy) and kept in ``toolchains.json`` in the shim's state
directory (:func:`cached`, which :mod:`larder.client.linker` uses for linkers too), so an
invocation normally pays for none of it.

* :func:`fingerprint`: ``rustc -vV`` (plus the BLAKE3 of the executable when ``RUSTC`` is
  neither the sysroot's compiler nor rustup's proxy: a wrapper), the sysroot, and each file in
  ``<sysroot>/lib/rustlib/<target>/lib`` (the standard library crates link against) by name and
  BLAKE3.
* :func:`native_cpu`: what ``-C target-cpu=native`` enables on this machine.
* :func:`tools`: what a link also takes from the sysroot: every file under
  ``<sysroot>/lib/rustlib/<host>/bin`` (``rust-lld`` and the ``gcc-ld`` wrappers rustc hands
  the C compiler with ``-B``) and in the subdirectories of the target's ``lib`` (the
  ``self-contained`` start files and C library), by path relative to the sysroot and BLAKE3.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import blake3

from larder.client.atomic import replace_with
from larder.client.digests import file_digest
from larder.client.key import tree_digests


class Fingerprint(NamedTuple):
    version: str  # rustc -vV
    sysroot: str
    libraries: list[tuple[str, str]]  # key item 3

    @property
    def host(self) -> str:
        return _field(self.version, "host")

    @property
    def release(self) -> tuple[int, int]:
        """``(major, minor)`` of the release line (``1.95.0``, ``1.96.0-nightly``)."""
        parts = _field(self.version, "release").split(".")
        try:
            return int(parts[0]), int(parts[1])
        except (IndexError, ValueError):
            return 0, 0


def _field(version: str, name: str) -> str:
    prefix = f"{name}:"
    return next(
        (line[len(prefix) :].strip() for line in version.splitlines() if line.startswith(prefix)),
        "",
    )


def libraries(sysroot: str, target: str) -> list[tuple[str, str]]:
    """Name and BLAKE3 of each file in the target's ``lib`` directory of the sysroot."""
    directory = Path(sysroot, "lib", "rustlib", target, "lib")
    if not directory.is_dir():
        return []
    return [(p.name, file_digest(p)) for p in sorted(directory.iterdir()) if p.is_file()]


#: Seconds a tool asked for a fact (a version, search directories) may take.
RUN_TIMEOUT = 60.0


def run(command: list[str], environ: dict[str, str] | None = None) -> str:
    """``command``'s standard output; an :class:`OSError` unless it exits with 0 within
    :data:`RUN_TIMEOUT` seconds (a tool that hangs is killed: no fact is worth the build)."""
    import subprocess  # only when a fact is not cached yet

    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            env=environ,
            timeout=RUN_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"{command[0]} took longer than {RUN_TIMEOUT:.0f} s") from None
    _check(command, done.returncode)
    return done.stdout


def _check(command: list[str], code: int) -> None:
    if code != 0:
        raise OSError(f"{command[0]} {' '.join(command[1:3])} exited with {code}")


def run_both(first: list[str], second: list[str]) -> tuple[str, str]:
    """The standard output of two commands run side by side (as :func:`run`)."""
    import subprocess

    started = [
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        for command in (first, second)
    ]
    outputs = [process.communicate()[0].decode() for process in started]
    for command, process in zip((first, second), started, strict=True):
        _check(command, process.returncode)
    return outputs[0], outputs[1]


def binary_identity(path: str) -> str:
    """What changes when a binary is replaced: its real path, size and modification time."""
    stat = os.stat(path)
    return f"{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}"


def resolve(program: str, environ: dict[str, str], first: list[str] | None = None) -> str:
    """The executable ``program`` names: as given when it holds a ``/``, else looked up in
    ``first`` and then ``PATH``."""
    if os.sep in program:
        return program
    dirs = [*(first or []), *environ.get("PATH", os.defpath).split(os.pathsep)]
    for directory in dirs:
        candidate = os.path.join(directory or ".", program)
        if os.access(candidate, os.X_OK) and os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"{program} not found on PATH")


#: Longest wait for another process computing the same facts before computing them too.
LOCK_WAIT = 10.0


def _known(cache_file: Path) -> dict[str, Any]:
    try:
        known = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _lock(lock_file: Path) -> int | None:
    """An exclusive ``flock`` on ``lock_file`` (its descriptor), waiting at most
    :data:`LOCK_WAIT` seconds; None when it cannot be had."""
    import fcntl
    import time

    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(0.005)


#: Entries a facts file keeps, the newest (each toolchain update, each rustup override, each
#: target adds some; the file is read on every call).
MAX_KEPT = 256


def cached(
    state_dir: Path,
    name: str,
    identity: str,
    compute: Callable[[], dict[str, Any]],
    aliases: Callable[[dict[str, Any]], list[str]] | None = None,
    still: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """``compute()``, once per ``identity``, remembered in the JSON object ``state_dir/name``
    (and under each of ``aliases(entry)``: other identities the same facts answer).

    The first calls of a build start together: the one that computes holds ``name.lock``, and
    the others wait for its entry rather than compute the same facts beside it (each would take
    the other's CPU). One that waited :data:`LOCK_WAIT` seconds computes anyway; the file is
    replaced atomically, so at worst an entry is computed twice. Facts computed while
    ``still()`` stopped holding (the identity changed under them: a toolchain file edited) are
    used for this call and not kept.
    """
    cache_file = state_dir / name
    entry = _known(cache_file).get(identity)
    if isinstance(entry, dict):
        return entry
    with contextlib.suppress(OSError):  # unwritable: the facts are computed, just not kept
        state_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock(state_dir / f"{name}.lock")
    try:
        known = _known(cache_file)
        entry = known.get(identity)
        if isinstance(entry, dict):
            return entry  # computed while this call waited
        entry = compute()
        if still is not None and not still():
            return entry
        for alias in {identity, *(aliases(entry) if aliases else [])}:
            known.pop(alias, None)  # the newest last
            known[alias] = entry
        for stale in list(known)[: max(0, len(known) - MAX_KEPT)]:  # the oldest first
            del known[stale]
        with contextlib.suppress(OSError):  # not kept: the next call computes them again
            replace_with(cache_file, json.dumps(known).encode())
    finally:
        if lock is not None:
            os.close(lock)
    return entry


def _rustc_identity(rustc: str, environ: dict[str, str]) -> str:
    # "4|": entries of this layout (older ones lack the sysroot, a wrapper's digest, or the
    # digest of a sysroot's bin/rustc that is a script).
    toolchain = environ.get("RUSTUP_TOOLCHAIN", "")
    chosen = (
        _toolchain_identity(toolchain, environ) if toolchain else _rustup_choice(rustc, environ)
    )
    return f"4|{binary_identity(rustc)}|{toolchain}{chosen}"


#: The files rustup reads a directory's toolchain from, in the order it looks for them.
TOOLCHAIN_FILES = ("rust-toolchain", "rust-toolchain.toml")


def _rustup_choice(rustc: str, environ: dict[str, str]) -> str:
    """What rustup's proxy, run without ``RUSTUP_TOOLCHAIN`` (a cargo not started through
    rustup), chooses the toolchain by at this call: its settings (the default toolchain and
    directory overrides, with the override that applies here) and the nearest toolchain file
    above the working directory, by content (not by path: each checkout would add its own
    entry), and what each installed toolchain's compiler is (``rustup update`` changes no
    setting). Facts kept for the proxy alone were one toolchain's for every other the proxy
    picked: a ``rust-toolchain.toml`` switched to nightly uploaded nightly's outputs under
    stable's key. Empty for anything but the proxy."""
    if not _is_rustup_proxy(rustc):
        return ""
    home = environ.get("RUSTUP_HOME") or os.path.join(os.path.expanduser("~"), ".rustup")
    cwd = os.getcwd()
    settings = _read(os.path.join(home, "settings.toml"))
    files: list[str] = []
    for directory in _ancestors(cwd):
        files = [
            p for p in (os.path.join(directory, n) for n in TOOLCHAIN_FILES) if os.path.isfile(p)
        ]
        if files:
            break
    parts = [_override(settings, cwd)]
    for content in (settings, *(_read(path) for path in files)):
        parts.append(blake3.blake3(content).hexdigest()[:32] if content is not None else "-")
    toolchains = os.path.join(home, "toolchains")
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir(toolchains)):
            with contextlib.suppress(OSError):
                parts.append(binary_identity(os.path.join(toolchains, name, "bin", "rustc")))
    return "|rustup:" + ",".join(parts)


def _read(path: str) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except OSError:
        return None


def _ancestors(directory: str) -> Iterator[str]:
    """``directory`` and each directory above it, up to the root."""
    while True:
        yield directory
        parent = os.path.dirname(directory)
        if parent == directory:
            return
        directory = parent


def _override(settings: bytes | None, cwd: str) -> str:
    """The toolchain rustup's settings (``[overrides]``, ``rustup override set``) give ``cwd``:
    the entry for it or its nearest ancestor, ``-`` when none does (the settings' content alone
    is the same in every directory)."""
    if settings is None or b"overrides" not in settings:
        return "-"
    import tomllib

    try:
        overrides = tomllib.loads(settings.decode()).get("overrides", {})
    except ValueError:  # malformed TOML, or not UTF-8
        return "-"
    if not isinstance(overrides, dict):
        return "-"
    for directory in _ancestors(cwd):
        chosen = overrides.get(directory)
        if isinstance(chosen, str):
            return f"override={chosen}"
    return "-"


def _toolchain_identity(toolchain: str, environ: dict[str, str]) -> str:
    """The compiler of rustup's toolchain ``toolchain``: rustup's proxy stays the same file when
    ``rustup update`` replaces what it runs, so facts cached by the proxy alone go stale."""
    if not toolchain or "/" in toolchain:
        return ""
    home = environ.get("RUSTUP_HOME") or os.path.join(os.path.expanduser("~"), ".rustup")
    try:
        return "|" + binary_identity(os.path.join(home, "toolchains", toolchain, "bin", "rustc"))
    except OSError:
        return ""


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _is_rustup_proxy(path: str) -> bool:
    """Whether ``path`` is rustup's proxy (rustup itself under another name: a link to the
    ``rustup`` beside it, or a copy of it)."""
    sibling = os.path.join(os.path.dirname(path), "rustup")
    if _same_file(path, sibling):
        return True
    try:
        return os.path.getsize(path) == os.path.getsize(sibling) and file_digest(
            Path(path)
        ) == file_digest(Path(sibling))
    except OSError:
        return False


def wrapper_line(path: str, sysroot: str) -> str:
    """A line for ``rustc -vV`` naming what stands between cargo and the sysroot's compiler:
    empty for the sysroot's own ``bin/rustc`` or rustup's proxy (both only select a toolchain,
    which ``-vV`` and the sysroot name), else the BLAKE3 of the executable ``RUSTC`` names (a
    script that adds flags is keyed by its text). A sysroot whose ``bin/rustc`` is itself a
    script (nixpkgs' wrapper, a distribution's) is keyed by its text too: it may add flags
    that neither ``-vV`` nor the standard library show."""
    if _is_rustup_proxy(path):
        return ""
    if _same_file(path, os.path.join(sysroot, "bin", "rustc")) and not _is_script(path):
        return ""
    return f"rustc-wrapper-blake3: {file_digest(Path(os.path.realpath(path)))}\n"


def _is_script(path: str) -> bool:
    """Whether the executable ``path`` is a script (``#!``), not a compiled program."""
    try:
        with open(path, "rb") as file:
            return file.read(2) == b"#!"
    except OSError:
        return False


def fingerprint(
    rustc: str, target: str | None, environ: dict[str, str], state_dir: Path
) -> Fingerprint:
    """``rustc -vV``, the sysroot and its libraries for key items 2 and 3."""
    path = resolve(rustc, environ)

    def compute() -> dict[str, Any]:
        version, sysroot = run_both([path, "-vV"], [path, "--print", "sysroot"])
        return {
            "version": version + wrapper_line(path, sysroot.strip()),
            "sysroot": sysroot.strip(),
            "libraries": libraries(sysroot.strip(), target or _field(version, "host")),
        }

    base = _rustc_identity(path, environ)

    def host_aliases(entry: dict[str, Any]) -> list[str]:
        # No --target and --target <host> (build scripts' probes pass it) are the same facts.
        host = _field(str(entry.get("version", "")), "host")
        return [f"{base}|", f"{base}|{host}"] if target in (None, host) else []

    identity = f"{base}|{target or ''}"
    entry = cached(
        state_dir,
        "toolchains.json",
        identity,
        compute,
        host_aliases,
        still=lambda: _rustc_identity(path, environ) == base,
    )
    try:
        return Fingerprint(
            str(entry["version"]),
            str(entry["sysroot"]),
            [(str(n), str(h)) for n, h in entry["libraries"]],
        )
    except (KeyError, TypeError, ValueError):
        raise ValueError("toolchains.json holds a malformed entry") from None


def tools(
    rustc: str,
    toolchain: Fingerprint,
    target: str | None,
    environ: dict[str, str],
    state_dir: Path,
) -> list[tuple[str, str]]:
    """The sysroot's linker tools and self-contained files: path under the sysroot, BLAKE3."""
    rustlib = Path(toolchain.sysroot, "lib", "rustlib")

    def compute() -> dict[str, Any]:
        found: list[tuple[str, str]] = []
        bin_dir = rustlib / toolchain.host / "bin"
        found += [(f"lib/rustlib/{toolchain.host}/bin/{p}", h) for p, h in tree_digests(bin_dir)]
        lib_dir = rustlib / (target or toolchain.host) / "lib"
        for sub in sorted(lib_dir.iterdir()) if lib_dir.is_dir() else []:
            if sub.is_dir() and not sub.is_symlink():
                prefix = sub.relative_to(toolchain.sysroot).as_posix()
                found += [(f"{prefix}/{p}", h) for p, h in tree_digests(sub)]
        return {"tools": found}

    base = _rustc_identity(resolve(rustc, environ), environ)
    same = [f"{base}||tools", f"{base}|{toolchain.host}|tools"]
    identity = f"{base}|{target or ''}|tools"
    entry = cached(
        state_dir, "toolchains.json", identity, compute, lambda _: same if identity in same else []
    )
    return [(str(p), str(h)) for p, h in entry.get("tools", [])]


@lru_cache(maxsize=1)
def _host_cpu() -> str | None:
    """The BLAKE3 of this machine's CPU description (``/proc/cpuinfo``'s model and flags),
    or None where there is none to read; read once per process."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            lines = info.read().splitlines()
    except OSError:
        return None
    wanted = ("model name", "flags", "Features", "CPU part", "isa")
    described = sorted({line for line in lines if line.split(":")[0].strip() in wanted})
    if not described:
        return None
    return blake3.blake3("\n".join(described).encode()).hexdigest()


def native_cpu(rustc: str, target: str | None, environ: dict[str, str], state_dir: Path) -> str:
    """The target features ``-C target-cpu=native`` enables here (rustc's ``--print cfg``
    ``target_feature`` lines): code built for one CPU may not run on another, so the key holds
    them. Cached per rustc, target and this machine's CPU (a state directory restored on
    another machine computes them again)."""
    path = resolve(rustc, environ)
    command = [path, "--print", "cfg", "-C", "target-cpu=native"]
    command += ["--target", target] if target else []

    def compute() -> dict[str, Any]:
        lines = run(command).splitlines()
        return {"features": sorted(x for x in lines if x.startswith("target_feature="))}

    cpu = _host_cpu()
    if cpu is None:
        entry = compute()
    else:
        identity = f"native|{_rustc_identity(path, environ)}|{target or ''}|{cpu}"
        entry = cached(state_dir, "toolchains.json", identity, compute)
    features = entry.get("features")
    if not isinstance(features, list):
        raise ValueError("toolchains.json holds a malformed entry")
    return "target-cpu-native: " + ",".join(str(f) for f in features) + "\n"
