"""What a link reads besides the compilation itself, for key item 11 (``link``).

Computed from a link line's tokens (:mod:`larder.client.linkline`) on the machine that computes
the key, so a link line recorded elsewhere only ever names things to look at here:

* ``line``: the tokens, every argument in order, in portable form.
* ``linker``: the C compiler driver the line starts with, resolved as rustc resolves it (the
  sysroot's tool directories, then ``PATH``): the first line of its ``--version`` (asked on
  every call: a wrapper script's answer changes with what it runs), its BLAKE3 and the library
  directories it hands the linker (``-print-search-dirs``, which includes ``LIBRARY_PATH``);
  the linker program it runs (``-print-prog-name=ld``, or ``ld.lld`` and so on with
  ``-fuse-ld=``) is among the inputs. All but the version are cached in ``linkers.json`` per
  driver binary, version, driver flags and :data:`LINK_ENV`.
* ``inputs``: every file the link reads, by portable path and BLAKE3, in this order: files on
  the line (each crate's rlib, objects, export lists; rustc's own temporary files are products
  and left out), ``-T`` scripts (searched like the linker does: as given, then in each ``-L``
  directory) and what they ``INCLUDE``; each ``-l`` resolved the way GNU ld and lld do (every
  ``-L`` directory of the line, then the driver's, each tried for ``lib<name>.so`` then
  ``lib<name>.a``, only ``.a`` in static mode, the exact name for ``-l:<file>``), with the files
  a linker-script library names (``libc.so`` is one); the driver's start files
  (:data:`START_FILES`, first found in its library directories); the linker program. A file in
  the sysroot takes its BLAKE3 from key item 3 or the sysroot's tools
  (:func:`larder.client.toolchain.tools`) instead of being hashed again.
* ``env``: the variables in :data:`LINK_ENV`, in portable form, or null when unset.

Left out: ``LD_LIBRARY_PATH`` (GNU ld reads it only to find what linked shared libraries
depend on, to check their symbols; it adds nothing to the output) and ``PATH`` (the programs it
finds are hashed).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from larder.client import toolchain
from larder.client.digests import file_digest
from larder.client.key import KeyUnavailable
from larder.client.linkline import RUSTC_TMP, Lib, Plan
from larder.client.paths import Roots

LINK_ENV = ("LIBRARY_PATH", "COMPILER_PATH", "GCC_EXEC_PREFIX", "LD_RUN_PATH")
START_FILES = (
    "crt1.o",
    "Scrt1.o",
    "rcrt1.o",
    "crti.o",
    "crtn.o",
    "crtbegin.o",
    "crtbeginS.o",
    "crtbeginT.o",
    "crtend.o",
    "crtendS.o",
    "libgcc.a",
    "libgcc_eh.a",
)
_MAX_SCRIPT_DEPTH = 8
_SCRIPT_WORD = re.compile(r"[()]|[^\s(),]+")
_COMMENT = re.compile(r"/\*.*?\*/", re.DOTALL)


class Link:
    """Computes item 11 for one compilation on this machine."""

    def __init__(
        self,
        *,
        roots: Roots,
        cwd: Path,
        environ: dict[str, str],
        state_dir: Path,
        fingerprint: toolchain.Fingerprint,
        covered: dict[str, str],
    ) -> None:
        self.roots = roots  # includes SYSROOT
        self.cwd = cwd
        self.env = environ
        self.state = state_dir
        self.toolchain = fingerprint
        self.covered = covered  # path under the sysroot -> BLAKE3
        self.sysroot = os.path.normpath(fingerprint.sysroot)

    # -- the pieces ------------------------------------------------------------------------

    def tool_dirs(self) -> list[str]:
        """What rustc puts first on the linker's ``PATH``."""
        base = os.path.join(self.sysroot, "lib", "rustlib", self.toolchain.host, "bin")
        return [base, os.path.join(base, "self-contained")]

    def local(self, token: str) -> Path:
        path = Path(self.roots.local(token))
        return path if path.is_absolute() else self.cwd / path

    def digest(self, path: Path) -> list[str]:
        """``[portable path, BLAKE3]``; files in the sysroot from the toolchain's digests."""
        normal = os.path.normpath(path)
        if normal.startswith(self.sysroot + os.sep):
            known = self.covered.get(normal[len(self.sysroot) + 1 :])
            if known is not None:
                return [self.roots.portable(normal), known]
        try:
            return [self.roots.portable(normal), file_digest(path)]
        except OSError as exc:
            raise KeyUnavailable(f"cannot read link input {normal}: {exc}") from None

    def facts(self, plan: Plan) -> dict[str, Any]:
        """The driver's facts (cached per binary, flags and :data:`LINK_ENV`)."""
        program = self.roots.local(plan.program)
        if os.sep in program and not os.path.isabs(program):
            program = str(self.cwd / program)
        driver = [self.roots.local(flag) for flag in plan.driver]
        run_env = {
            **self.env,
            "LC_ALL": "C",
            "PATH": os.pathsep.join([*self.tool_dirs(), self.env.get("PATH", os.defpath)]),
        }
        fuse = next((f.partition("=")[2] for f in driver if f.startswith("-fuse-ld=")), "")
        try:
            path = toolchain.resolve(program, run_env)
            # Asked every time: a wrapper script's version changes with what it runs.
            version = toolchain.run([path, "--version"], run_env)
            identity = "|".join(
                [toolchain.binary_identity(path), version, " ".join(driver)]
                + [f"{name}={self.env.get(name)}" for name in LINK_ENV]
            )

            def compute() -> dict[str, Any]:
                queries = [path, *driver]
                dirs = search_dirs(toolchain.run([*queries, "-print-search-dirs"], run_env))
                ld_name = f"ld.{fuse}" if fuse else "ld"
                ld = toolchain.run([*queries, f"-print-prog-name={ld_name}"], run_env).strip()
                return {
                    "driver_blake3": file_digest(path),
                    "ld": toolchain.resolve(ld, run_env) if ld else "",
                    "search": dirs,
                }

            facts = toolchain.cached(self.state, "linkers.json", identity, compute)
        except (OSError, ValueError) as exc:
            raise KeyUnavailable(f"linker {program} answers no driver queries: {exc}") from None
        search = facts.get("search")
        if (
            not isinstance(facts.get("driver_blake3"), str)
            or not isinstance(facts.get("ld"), str)
            or not isinstance(search, list)
            or not all(isinstance(d, str) for d in search)
        ):
            raise KeyUnavailable("linkers.json holds a malformed entry")
        return {**facts, "driver": version.strip().partition("\n")[0]}

    def find(self, name: str, dirs: list[Path]) -> Path | None:
        for directory in dirs:
            candidate = directory / name
            if candidate.is_file():
                return candidate
        return None

    def lib(self, lib: Lib, dirs: list[Path]) -> Path:
        if lib.name.startswith(":"):
            names = [lib.name[1:]]
        elif lib.static:
            names = [f"lib{lib.name}.a"]
        else:
            names = [f"lib{lib.name}.so", f"lib{lib.name}.a"]
        for directory in dirs:
            for name in names:
                if (directory / name).is_file():
                    return directory / name
        raise KeyUnavailable(f"library -l{lib.name} not found")

    def read(
        self, path: Path, dirs: list[Path], static: bool, out: list[list[str]], depth: int = 0
    ) -> None:
        """Add ``path`` and, for a linker script, every file it names."""
        entry = self.digest(path)
        if entry in out:
            return
        out.append(entry)
        references = script_references(path)
        if references is None:
            return
        if depth >= _MAX_SCRIPT_DEPTH:
            raise KeyUnavailable(f"linker scripts nest too deeply at {path}")
        for ref in references:
            if ref.startswith("-l"):
                found: Path | None = self.lib(Lib(ref[2:], static), dirs)
            elif os.path.isabs(ref):
                found = Path(ref)
            else:
                found = self.find(ref, [self.cwd, path.parent, *dirs])
            if found is None:
                raise KeyUnavailable(f"linker script {path} names {ref}, which is not found")
            self.read(found, dirs, static, out, depth + 1)

    # -- the item --------------------------------------------------------------------------

    def item(self, tokens: list[str], plan: Plan) -> dict[str, Any]:
        """Key item 11 for a link line."""
        facts = self.facts(plan)
        dirs = [self.local(d) for d in plan.search if not d.startswith(RUSTC_TMP)]
        dirs += [Path(d) for d in facts["search"]]
        inputs: list[list[str]] = []
        for name in plan.files:
            if not name.startswith(RUSTC_TMP):
                self.read(self.local(name), dirs, False, inputs)
        for name in plan.scripts:
            found = self.find(self.roots.local(name), [self.cwd, *dirs])
            if found is None:
                raise KeyUnavailable(f"linker script {name} not found")
            self.read(found, dirs, False, inputs)
        for lib in plan.libs:
            self.read(self.lib(lib, dirs), dirs, lib.static, inputs)
        start = [Path(d) for d in facts["search"]]
        for name in START_FILES:
            found = self.find(name, start)
            inputs.append([name, self.digest(found)[1] if found else "absent"])
        if facts["ld"]:
            inputs.append(self.digest(Path(facts["ld"])))
        env = [
            [name, None if self.env.get(name) is None else self.roots.portable(self.env[name])]
            for name in LINK_ENV
        ]
        linker = {
            "driver": facts["driver"],
            "driver_blake3": facts["driver_blake3"],
            "search": [self.roots.portable(d) for d in facts["search"]],
        }
        return {"line": tokens, "linker": linker, "inputs": inputs, "env": env}


def search_dirs(text: str) -> list[str]:
    """The ``libraries:`` line of ``-print-search-dirs``, normalised, in order, once each."""
    for line in text.splitlines():
        if line.startswith("libraries:"):
            value = line.partition(":")[2].strip().lstrip("=")
            dirs: list[str] = []
            for part in value.split(os.pathsep):
                if part and os.path.normpath(part) not in dirs:
                    dirs.append(os.path.normpath(part))
            return dirs
    raise ValueError("no libraries: line in -print-search-dirs")


def script_references(path: Path) -> list[str] | None:
    """The files a linker script names (``INPUT``, ``GROUP``, ``AS_NEEDED``, ``INCLUDE``);
    None for an ELF object, an archive or anything else that is not text."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if head.startswith((b"\x7fELF", b"!<arch>", b"!<thin>")):
                return None
            data = head + handle.read(1024 * 1024)
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if "\0" in text:
        return None
    words = _SCRIPT_WORD.findall(_COMMENT.sub(" ", text))
    found: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word == "SEARCH_DIR":
            raise KeyUnavailable(f"linker script {path} adds search directories")
        if word == "INCLUDE" and i + 1 < len(words):
            found.append(words[i + 1].strip("\"'"))
            i += 2
            continue
        if word in ("INPUT", "GROUP") and i + 1 < len(words) and words[i + 1] == "(":
            depth, i = 1, i + 2
            while i < len(words) and depth:
                inner = words[i]
                depth += {"(": 1, ")": -1}.get(inner, 0)
                if inner not in ("(", ")", "AS_NEEDED"):
                    found.append(inner.strip("\"'"))
                i += 1
            continue
        i += 1
    return found
