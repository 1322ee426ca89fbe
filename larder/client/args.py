"""What a rustc command line asks for, and whether its result can be cached.

Cargo invokes ``RUSTC_WRAPPER rustc ARGS...``. This module reads ARGS the way rustc does
(``--flag value`` and ``--flag=value``; ``-Cx``, ``-C x``; ``-L``/``-l``/``-W``... likewise) into
ordered ``(flag, value)`` pairs plus the input file, without interpreting flags it does not
need. A command is a *compilation* when it has an input file and asks for no ``--print``,
``--version`` or ``--explain``; anything else is passed straight to rustc.

A compilation is *cacheable* when ``--crate-type`` names only ``lib``, ``rlib``, ``staticlib``
or a *linked* type (``bin``, ``dylib``, ``cdylib``, ``proc-macro``: the output is made by the
linker, see :mod:`larder.client.linkline` for their further rules), it emits only ``dep-info``,
``metadata`` and ``link`` into ``--out-dir`` (no per-kind paths, no ``-o``), and it uses none
of: ``-C incremental``, ``--test``, ``@argfiles``, stdin input, ``-C save-temps``,
profile-guided optimisation, split debug info (``-C split-debuginfo=packed|unpacked``),
``--sysroot`` (a standard library other than the toolchain's, which the key hashes), a ``-Z``
option that names a file (:func:`_reads_a_file`: the key holds ``-Z`` options as text), or, for a
crate type that carries metadata, a ``--remap-path-scope`` narrower than ``all``
(:func:`_remaps_everything`).
:attr:`Compilation.reason` names the first rule broken.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import NamedTuple

from larder.client.probe import NOT_COMPILATION_FLAGS

# Flags whose value may be the next argument.
_TAKES_VALUE = frozenset(
    {
        "--cfg",
        "--check-cfg",
        "-L",
        "-l",
        "--crate-type",
        "--crate-name",
        "--edition",
        "--emit",
        "--print",
        "-o",
        "--out-dir",
        "--explain",
        "--target",
        "-A",
        "-W",
        "-D",
        "-F",
        "--force-warn",
        "--cap-lints",
        "-C",
        "--codegen",
        "-Z",
        "--extern",
        "--sysroot",
        "--error-format",
        "--json",
        "--color",
        "--diagnostic-width",
        "--remap-path-prefix",
        "--remap-path-scope",
        "--env-set",
        "--extern-location",
        "--crate-attr",
    }
)
_SHORT_JOINED = ("-C", "-L", "-l", "-A", "-W", "-D", "-F", "-Z", "-o")
LINKED_CRATE_TYPES = frozenset({"bin", "dylib", "cdylib", "proc-macro"})
CACHEABLE_CRATE_TYPES = frozenset({"lib", "rlib", "staticlib"}) | LINKED_CRATE_TYPES
CACHEABLE_EMITS = frozenset({"dep-info", "metadata", "link"})
#: Crate types whose outputs carry crate metadata (an rmeta, in the rlib or the library).
_METADATA_CRATE_TYPES = frozenset({"lib", "rlib", "dylib", "proc-macro"})
#: ``--remap-path-scope`` values, and what ``object`` stands for; ``all`` is rustc's default.
_REMAP_SCOPES = frozenset({"macro", "diagnostics", "debuginfo", "coverage", "documentation"})
_SCOPE_ALIASES = {"object": frozenset({"macro", "coverage", "debuginfo"}), "all": _REMAP_SCOPES}


class Compilation(NamedTuple):
    """A parsed rustc command line."""

    flags: tuple[tuple[str, str | None], ...]
    input: str | None
    reason: str | None  # why it is not cacheable, None if it is

    @property
    def is_compilation(self) -> bool:
        return self.input is not None and not any(
            flag in NOT_COMPILATION_FLAGS for flag, _ in self.flags
        )

    @property
    def cacheable(self) -> bool:
        return self.is_compilation and self.reason is None

    def argv(self, without: frozenset[str] = frozenset()) -> list[str]:
        """The command line again (flags in canonical form, input last), minus ``without``."""
        out: list[str] = []
        for flag, value in self.flags:
            if flag in without:
                continue
            if value is None:
                out.append(flag)
            elif flag.startswith("--"):
                out.append(f"{flag}={value}")
            else:
                out += [flag, value]
        return out + ([self.input] if self.input is not None else [])

    def values(self, flag: str) -> list[str]:
        return [value for name, value in self.flags if name == flag and value is not None]

    def codegen(self) -> dict[str, str]:
        """``-C name[=value]`` options (last one wins, as in rustc)."""
        options: dict[str, str] = {}
        for value in self.values("-C"):
            name, _, setting = value.partition("=")
            options[name] = setting
        return options

    @property
    def crate_name(self) -> str | None:
        names = self.values("--crate-name")
        return names[-1] if names else None

    @property
    def crate_types(self) -> list[str]:
        return [t for value in self.values("--crate-type") for t in value.split(",") if t]

    @property
    def linked(self) -> bool:
        """Whether the linker makes an output (a binary or a shared library)."""
        return "link" in self.emits and any(t in LINKED_CRATE_TYPES for t in self.crate_types)

    @property
    def emits(self) -> list[str]:
        kinds = [k for value in self.values("--emit") for k in value.split(",") if k]
        return kinds or ["link"]

    @property
    def out_dir(self) -> Path | None:
        dirs = self.values("--out-dir")
        return Path(dirs[-1]) if dirs else None

    @property
    def extra_filename(self) -> str:
        return self.codegen().get("extra-filename", "")

    @property
    def stem(self) -> str:
        return f"{self.crate_name}{self.extra_filename}"

    def expected_outputs(self) -> list[str]:
        """File names rustc writes into ``--out-dir`` for a cacheable compilation (a Linux
        target for linked crate types)."""
        stem = self.stem
        link_names = {"staticlib": f"lib{stem}.a", "bin": stem}
        names = []
        for kind in sorted(set(self.emits)):
            if kind == "dep-info":
                names.append(f"{stem}.d")
            elif kind == "metadata":
                names.append(f"lib{stem}.rmeta")
            elif kind == "link":
                for crate_type in sorted(set(self.crate_types)):
                    shared = f"lib{stem}.so" if crate_type in LINKED_CRATE_TYPES else None
                    names.append(link_names.get(crate_type) or shared or f"lib{stem}.rlib")
        return sorted(set(names))

    def executables(self) -> set[str]:
        """The outputs rustc's linker writes executable: a binary, a shared library."""
        return {
            name
            for name in self.expected_outputs()
            if name == self.stem or (name.startswith("lib") and name.endswith(".so"))
        }


def _canonical(name: str, value: str | None) -> tuple[str, str | None]:
    """A codegen option as rustc reads it, whichever way it was spelled: ``--codegen`` is
    ``-C``, and ``_`` in an option's name is ``-`` (``-Csplit_debuginfo=packed`` is
    ``-C split-debuginfo=packed``), so every rule about an option sees every spelling."""
    if name == "--codegen":
        name = "-C"
    if name == "-C" and value is not None:
        option, sep, setting = value.partition("=")
        value = option.replace("_", "-") + sep + setting
    return name, value


def split(args: list[str]) -> tuple[list[tuple[str, str | None]], list[str]]:
    """Arguments as ``(flag, value)`` pairs in order (codegen options in one spelling:
    :func:`_canonical`), and the positional arguments."""
    flags: list[tuple[str, str | None]] = []
    positional: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg.startswith("--") and "=" in arg:
            name, _, value = arg.partition("=")
            flags.append(_canonical(name, value))
        elif arg in _TAKES_VALUE:
            flags.append(_canonical(arg, args[i] if i < len(args) else None))
            i += 1
        elif arg.startswith(_SHORT_JOINED) and len(arg) > 2:
            flags.append(_canonical(arg[:2], arg[2:]))
        elif arg.startswith("-") and arg != "-":
            flags.append((arg, None))
        else:
            positional.append(arg)
    return flags, positional


def _reason(
    flags: list[tuple[str, str | None]], positional: list[str], c: Compilation
) -> str | None:
    if any(arg.startswith("@") for arg in positional):
        return "argfile"
    if any(value is None and name in _TAKES_VALUE for name, value in flags):
        return "missing-value"
    if len(positional) != 1:
        return "inputs"
    if positional[0] == "-":
        return "stdin"
    if not c.crate_name:  # missing, or empty (which rustc refuses)
        return "no-crate-name"
    if any(name == "--test" for name, _ in flags):
        return "test"  # cargo passes no --crate-type with it
    types = c.crate_types
    if not types:  # rustc would read #![crate_type] from the source, or build a binary
        return "crate-type:unspecified"
    for crate_type in types:
        if crate_type not in CACHEABLE_CRATE_TYPES:
            return f"crate-type:{crate_type}"
    codegen = c.codegen()
    if "incremental" in codegen:
        return "incremental"
    if any(name in codegen for name in ("save-temps", "profile-generate", "profile-use")):
        return "codegen-option"
    if codegen.get("split-debuginfo", "off") not in ("off", ""):
        return "split-debuginfo"
    if _METADATA_CRATE_TYPES & set(types) and not _remaps_everything(c):
        return "remap-path-scope"
    for value in c.values("--emit"):
        for kind in value.split(","):
            if "=" in kind:
                return "emit-path"
            if kind not in CACHEABLE_EMITS:
                return f"emit:{kind}"
    if c.values("-o"):
        return "output-file"
    if c.out_dir is None:
        return "no-out-dir"
    if c.values("--sysroot"):  # another standard library than the one key item 3 hashes
        return "sysroot"
    if any(_reads_a_file(value) for value in c.values("-Z")):
        return "unstable-option-file"
    return None


#: Nightly ``-Z`` options that read a file the key would know only by its name.
_Z_FILE_OPTIONS = frozenset(
    {"llvm-plugins", "profile-sample-use", "sanitizer-dataflow-abilist", "translate-additional-ftl"}
)


def _reads_a_file(value: str) -> bool:
    """Whether a ``-Z`` option names a file: a known one, ``codegen-backend`` given a library
    (a name with ``.`` or ``/``; a bare name is the toolchain's own), or any other value with a
    path in it, but for the ``remap-*`` options, whose paths are prefixes, not files (the key
    holds ``-Z`` options as text, which tells nothing of a file's content)."""
    option, _, setting = value.partition("=")
    option = option.replace("_", "-")
    if option in _Z_FILE_OPTIONS:
        return True
    if option == "codegen-backend":
        return "." in setting or "/" in setting
    return "/" in setting and not option.startswith("remap-")


def _remaps_everything(c: Compilation) -> bool:
    """Whether ``--remap-path-prefix`` applies in every scope (rustc's default, ``all``).

    With a narrower ``--remap-path-scope`` (``object``, stable since rustc 1.95, or nightly's
    ``-Z remap-path-scope``) rustc writes the real local paths beside the remapped ones into
    the crate metadata, so a library's outputs name this machine's directories."""
    given = list(c.values("--remap-path-scope"))
    given += [v.partition("=")[2] for v in c.values("-Z") if v.startswith("remap-path-scope=")]
    if not given:
        return True
    scopes: set[str] = set()
    for value in given:
        for scope in value.split(","):
            scopes |= _SCOPE_ALIASES.get(scope, {scope})
    return scopes >= _REMAP_SCOPES


def parse(args: list[str]) -> Compilation:
    """Parse rustc's arguments (without the rustc path itself).

    Without ``--crate-type`` and ``--test`` (cargo's ``harness = false`` tests and benches)
    rustc builds a binary unless the crate root declares ``crate_type``: such a compilation
    reads as ``--crate-type bin`` when the crate root's text never names ``crate_type``."""
    flags, positional = split(args)
    inputs = [arg for arg in positional if not arg.startswith("@")]
    if _binary_by_default(flags, inputs):
        flags.append(("--crate-type", "bin"))
    draft = Compilation(tuple(flags), inputs[0] if inputs else None, None)
    return Compilation(draft.flags, draft.input, _reason(flags, positional, draft))


def _binary_by_default(flags: list[tuple[str, str | None]], inputs: list[str]) -> bool:
    names = {name for name, _ in flags}
    if "--crate-type" in names or "--test" in names or "--crate-attr" in names:
        return False
    if len(inputs) != 1 or inputs[0] == "-" or any(v and "crate-attr" in v for _, v in flags):
        return False
    try:  # a regular file only: reading a pipe (`rustc <(...)`) would take rustc's input
        if not stat.S_ISREG(os.stat(inputs[0]).st_mode):
            return False
        with open(inputs[0], "rb") as root:
            return b"crate_type" not in root.read()
    except (OSError, ValueError):  # ValueError: a NUL in the path
        return False
