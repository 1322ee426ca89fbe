"""The linker command rustc runs for a linked crate, in portable form, and what it names.

Crate types ``bin``, ``dylib``, ``cdylib`` and ``proc-macro`` end in a link: rustc runs a C
compiler driver (``cc``, or ``-C linker=``) with the crate's objects, the rlib of every crate in
the dependency graph, native libraries (``-l`` from the command line and from the metadata of
the crates linked, which is where a build script's ``cargo:rustc-link-lib`` ends up) and link
arguments; the driver adds its start files and search directories. rustc writes that command
on request, ``--print=link-args=FILE`` (rustc 1.75 and later): ``NAME=value`` assignments, then
the program and its arguments, shell-quoted.

:func:`normalise` turns it into *tokens* that name the same things on every machine: the
assignments are dropped (rustc sets ``LC_ALL``, ``VSLANG`` and a ``PATH`` that starts with the
sysroot's tool directories, which :mod:`larder.client.linker` rebuilds), so are the output
(``-o FILE``) and the compilation's own objects (``<out-dir>/<crate><extra>.*.o``), which are
what the key describes rather than inputs; rustc's temporary directory
(``<out-dir>/rustcXXXXXX``: generated objects, the export list, raw-dylib stubs) becomes
``@LARDER:RUSTC_TMP@``, the sysroot ``@LARDER:SYSROOT@`` and the roots of
:mod:`larder.client.paths` their placeholders.

:func:`classify` reads tokens the way a gcc-compatible driver and a GNU-compatible linker do
(``-Wl,a,b`` and ``-Xlinker a`` pass arguments on; ``-Bstatic``/``-Bdynamic``/``-static`` and
``--push-state``/``--pop-state`` decide whether ``-l`` takes ``.so`` or only ``.a``) into a
:class:`Plan`. Only arguments on the lists below are accepted. Anything else raises
:class:`Unaccounted` and the compilation is not cached: an unknown argument (``link-arg``: it
might make the linker read a file the key does not hash), a linker plugin or LTO option
(``linker-plugin``), a response file, ``-B`` or ``--sysroot`` outside rustc's sysroot, a
``-fuse-ld`` that is a path. :func:`check_compilation` applies the same reading to ``-C
link-arg``/``-C link-args`` before a compilation, with the other rules for linked crates.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from larder.client.args import LINKED_CRATE_TYPES, Compilation

RUSTC_TMP = "@LARDER:RUSTC_TMP@"
SYSROOT = "@LARDER:SYSROOT@"
MIN_RELEASE = (1, 75)  # --print KIND=PATH

_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
_RUSTC_TMP = re.compile(r"/rustc[A-Za-z0-9]{6}(?=/|$)")

# Driver arguments that read no file (beyond the start files and libraries the driver picks,
# which the linker facts cover).
_DRIVER_FLAGS = frozenset(
    {
        "-m64",
        "-m32",
        "-pie",
        "-no-pie",
        "-static-pie",
        "-static",
        "-shared",
        "-nodefaultlibs",
        "-nostartfiles",
        "-nostdlib",
        "-rdynamic",
        "-pthread",
        "-s",
    }
)
_FUSE_LD = frozenset({"lld", "bfd", "gold", "mold"})
# Linker arguments that read no file.
_LD_FLAGS = frozenset(
    {
        "--as-needed",
        "--no-as-needed",
        "--eh-frame-hdr",
        "--gc-sections",
        "--no-gc-sections",
        "--strip-all",
        "--strip-debug",
        "-s",
        "-S",
        "--no-undefined-version",
        "--undefined-version",
        "--enable-new-dtags",
        "--disable-new-dtags",
        "--whole-archive",
        "--no-whole-archive",
        "--export-dynamic",
        "-E",
        "--no-export-dynamic",
        "--no-undefined",
        "-Bsymbolic",
        "-Bsymbolic-functions",
        "--build-id",
        "--sort-common",
        "-O0",
        "-O1",
        "-O2",
        "-O3",
        "-pie",
        "--pie",
        "-no-pie",
        "--no-pie",
        "-shared",
        "--shared",
        "--fatal-warnings",
        "--warn-common",
        "--allow-shlib-undefined",
        "--no-allow-shlib-undefined",
        "--discard-all",
        "-x",
        "--discard-locals",
        "-X",
        "--relax",
        "--no-relax",
        "--no-copy-dt-needed-entries",
        "--no-rosegment",
        "--rosegment",
    }
)
_STATIC = frozenset({"-Bstatic", "-dn", "-non_shared", "-static"})
_DYNAMIC = frozenset({"-Bdynamic", "-dy", "-call_shared"})
# Linker options with a value that is text, not a file (``-z relro``, ``-soname=libx.so``).
_LD_TEXT_VALUE = frozenset(
    {
        "-z",
        "-soname",
        "--soname",
        "-h",
        "-rpath",
        "--rpath",
        "--hash-style",
        "--build-id",
        "--compress-debug-sections",
        "--threads",
        "-m",
        "--exclude-libs",
        "-u",
        "--undefined",
        "--defsym",
        "--wrap",
        "-e",
        "--entry",
        "--image-base",
        "--error-limit",
        "--icf",
    }
)
_LD_FILE_VALUE = frozenset({"--version-script", "--dynamic-list"})
_LD_SCRIPT_VALUE = frozenset({"-T", "--script"})  # also searched in -L directories
_PLUGIN = ("-plugin", "--plugin", "-flto", "-fuse-linker-plugin", "--lto", "--thinlto", "-fplugin")
_LINKER_FLAVORS = frozenset({"", "gcc", "gnu-cc", "gnu-lld-cc"})
_NATIVE_KINDS = frozenset({"", "static", "dylib"})
_OFF = frozenset({"n", "no", "off", "false"})


class Unaccounted(Exception):
    """A link the key cannot describe; ``kind`` is the reason counted in the stats."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


class Lib(NamedTuple):
    """One ``-l``: ``c`` for ``-lc``, ``:libx.so.1`` for ``-l:libx.so.1``."""

    name: str
    static: bool  # only lib<name>.a qualifies


class Plan(NamedTuple):
    """What a link line names, in its order (paths still in portable form)."""

    program: str
    driver: tuple[str, ...]  # -m32/-m64, -fuse-ld=, -B<dir>: they choose and steer the driver
    search: tuple[str, ...]  # -L directories
    libs: tuple[Lib, ...]
    files: tuple[str, ...]  # rlibs, objects, archives, export lists: by path
    scripts: tuple[str, ...]  # -T scripts: by path, or by name in a -L directory


def parse(text: str) -> list[str]:
    """The program and arguments of a ``--print=link-args`` file (assignments dropped)."""
    import shlex  # uploads only

    try:
        argv = shlex.split(text)
    except ValueError as exc:
        raise Unaccounted("link-line", f"cannot read the link line: {exc}") from None
    while argv and _ASSIGNMENT.match(argv[0]):
        argv.pop(0)
    if not argv:
        raise Unaccounted("link-line", "the link line is empty")
    return argv


def normalise(
    argv: list[str], *, out_dirs: Sequence[str], stem: str, portable: Callable[[str], str]
) -> list[str]:
    """Tokens of a link line: output and own objects dropped, paths in portable form.

    ``out_dirs`` are the ways the line may spell ``--out-dir``; ``portable`` is
    :meth:`larder.client.paths.Roots.portable` of roots that include ``SYSROOT`` and
    ``RUSTC_TMP``.
    """
    spellings = tuple(f"{d.rstrip('/')}/{stem}." for d in out_dirs)

    def own(token: str) -> bool:
        """An object rustc wrote for this crate: ``<out dir>/<stem>.<anything>.o``."""
        return token.endswith(".o") and any(
            token.startswith(s) and len(token) >= len(s) + 2 and "/" not in token[len(s) : -2]
            for s in spellings
        )

    tokens = [portable(argv[0])]
    arguments = iter(argv[1:])
    for token in arguments:
        if token == "-o":
            next(arguments, None)
        elif not own(token):
            tokens.append(portable(token))
    return tokens


def rustc_tmp(argv: list[str], parents: Sequence[str]) -> str | None:
    """rustc's temporary directory (``<parent>/rustcXXXXXX``) as the line spells it."""
    for token in argv:
        for parent in parents:
            prefix = parent.rstrip("/") + "/rustc"
            start = token.find(prefix)
            if start == -1:
                continue
            match = _RUSTC_TMP.match(token, start + len(prefix) - len("/rustc"))
            if match:
                return token[start : match.end()]
    return None


class _Reader:
    """State while reading a link line: the ``-l`` search mode and what was named."""

    def __init__(self) -> None:
        self.static = False
        self.all_static = False
        self.saved: list[bool] = []
        self.driver: list[str] = []
        self.search: list[str] = []
        self.libs: list[Lib] = []
        self.files: list[str] = []
        self.scripts: list[str] = []

    def lib(self, name: str) -> None:
        if not name:
            raise Unaccounted("link-arg", "-l without a name")
        self.libs.append(Lib(name, self.static or self.all_static))

    def linker(self, arguments: Iterator[str]) -> None:
        """Arguments for the linker itself (``-Wl,`` lists, ``-Xlinker``)."""
        for arg in arguments:
            name, eq, value = arg.partition("=")
            if arg in _STATIC:
                self.static = True
            elif arg in _DYNAMIC:
                self.static = False
            elif arg == "--push-state":
                self.saved.append(self.static)
            elif arg == "--pop-state":
                self.static = self.saved.pop() if self.saved else False
            elif arg in _LD_FLAGS:
                pass
            elif arg.startswith(_PLUGIN) or arg.startswith("-plugin-opt"):
                raise Unaccounted("linker-plugin", arg)
            elif arg in ("-L", "--library-path") or name == "--library-path":
                self.search.append(value if eq else _value(arguments, arg))
            elif arg.startswith("-L"):
                self.search.append(arg[2:])
            elif arg in ("-l", "--library") or name == "--library":
                self.lib(value if eq else _value(arguments, arg))
            elif arg.startswith("-l"):
                self.lib(arg[2:])
            elif arg in _LD_TEXT_VALUE:
                _value(arguments, arg)
            elif (eq and name in _LD_TEXT_VALUE) or (arg.startswith("-z") and len(arg) > 2):
                pass  # -soname=x, -zrelro
            elif arg in _LD_FILE_VALUE or (eq and name in _LD_FILE_VALUE):
                self.files.append(value if eq else _value(arguments, arg))
            elif arg in _LD_SCRIPT_VALUE or (eq and name in _LD_SCRIPT_VALUE):
                self.scripts.append(value if eq else _value(arguments, arg))
            elif arg.startswith("-T") and len(arg) > 2:
                self.scripts.append(arg[2:])
            elif _is_option(arg):
                raise Unaccounted("link-arg", f"linker argument {arg}")
            else:
                self.files.append(arg)

    def read(self, tokens: list[str]) -> Plan:
        arguments = iter(tokens[1:])
        for token in arguments:
            if token.startswith("-Wl,"):
                self.linker(iter(token[4:].split(",")))
            elif token == "-Xlinker":
                self.linker(iter([_value(arguments, token)]))
            elif token == "-L":
                self.search.append(_value(arguments, token))
            elif token == "-l":
                self.lib(_value(arguments, token))
            elif token.startswith("-L"):
                self.search.append(token[2:])
            elif token.startswith("-l"):
                self.lib(token[2:])
            elif token.startswith("-T"):  # the driver passes scripts on
                self.scripts.append(token[2:] or _value(arguments, token))
            elif token.startswith(_PLUGIN):
                raise Unaccounted("linker-plugin", token)
            elif token.startswith("-fuse-ld="):
                if token[len("-fuse-ld=") :] not in _FUSE_LD:
                    raise Unaccounted("link-arg", token)
                self.driver.append(token)
            elif token.startswith("-B"):
                directory = token[2:] or _value(arguments, token)
                if not directory.startswith(SYSROOT + "/"):
                    raise Unaccounted("link-arg", f"-B {directory}")
                self.driver.append(f"-B{directory}")
            elif token == "-u":  # a symbol to pull in (-C instrument-coverage's runtime)
                _value(arguments, token)  # no file: what it pulls is among the files read
            elif token in _DRIVER_FLAGS:
                if token in ("-m32", "-m64"):
                    self.driver.append(token)
                if token in ("-static", "-static-pie"):
                    self.all_static = True
            elif _is_option(token):
                raise Unaccounted("link-arg", f"driver argument {token}")
            else:
                self.files.append(token)
        return Plan(
            tokens[0],
            tuple(self.driver),
            tuple(self.search),
            tuple(self.libs),
            tuple(self.files),
            tuple(self.scripts),
        )


def _is_option(token: str) -> bool:
    """An option or a response file (``@file``), not a path (placeholders start with ``@``)."""
    return token.startswith("-") or (token.startswith("@") and not token.startswith("@LARDER:"))


def _value(arguments: Iterator[str], flag: str) -> str:
    value = next(arguments, None)
    if value is None:
        raise Unaccounted("link-arg", f"{flag} without a value")
    return value


def classify(tokens: list[str]) -> Plan:
    """What a link line (program first) names; :class:`Unaccounted` if the key cannot say."""
    if not tokens:
        raise Unaccounted("link-line", "no program")
    return _Reader().read(tokens)


def link_args(compilation: Compilation) -> list[str]:
    """The arguments ``-C link-arg``/``-C link-args`` hand to the linker, in order."""
    found: list[str] = []
    for value in compilation.values("-C"):
        name, _, setting = value.partition("=")
        if name == "link-arg":
            found.append(setting)
        elif name == "link-args":
            found += setting.split()
    return found


def _is_linux(target: str | None) -> bool:
    if target is None:
        return sys.platform.startswith("linux")
    return "-linux-" in target and not target.endswith(".json")


def check_compilation(compilation: Compilation, cwd: Path) -> str | None:
    """Why a linked compilation cannot be cached before it runs, or None.

    Reasons: ``linked-target`` (not Linux: other output names and linkers), ``crate-types``
    (more than one linked crate type), ``unstable-option`` (``-Z``), ``linker-plugin``,
    ``linker-flavor``, ``rpath`` (``-C rpath`` embeds the path from the output to the
    sysroot), ``native-kind`` (``-l`` kinds other than static and dylib), ``link-arg`` and
    ``link-arg-file`` (a ``-C link-arg`` the key cannot describe, or one naming a file that is
    not there).
    """
    targets = compilation.values("--target")
    if not _is_linux(targets[-1] if targets else None):
        return "linked-target"
    if len(set(compilation.crate_types) & LINKED_CRATE_TYPES) > 1:
        return "crate-types"  # two links write one link-args file
    if any(name == "-Z" for name, _ in compilation.flags):
        return "unstable-option"
    codegen = compilation.codegen()
    if codegen.get("linker-plugin-lto", "no") not in _OFF:
        return "linker-plugin"
    if codegen.get("linker-flavor", "") not in _LINKER_FLAVORS:
        return "linker-flavor"
    if codegen.get("rpath", "no") not in _OFF:
        return "rpath"
    for value in compilation.values("-l"):
        kind, sep, _ = value.partition("=")
        if sep and kind.partition(":")[0] not in _NATIVE_KINDS:
            return "native-kind"
    try:
        plan = classify(["cc", *link_args(compilation)])
    except Unaccounted as exc:
        return exc.kind
    search = [cwd / d.partition("=")[2] if "=" in d else cwd / d for d in compilation.values("-L")]
    for name in plan.files:
        if not (cwd / name).is_file():
            return "link-arg-file"
    for name in plan.scripts:
        if not any((d / name).is_file() for d in [cwd, *search]):
            return "link-arg-file"
    return None
