"""The cache key of a rustc compilation.

Key format ``larder-rustc/2``: the BLAKE3 (hex) of a canonical JSON object (sorted keys, no
spaces) holding exactly these inputs, numbered as in the code below:

1. ``format``: the string ``larder-rustc/2``, the shape of this document. What the rules
   below put in it changes between releases of larder-rustc (a fix that keys one more input
   changes the key of every compilation that has it), so two releases seldom share a key: a
   team's clients share best on one release, and an upgrade costs one cold build.
2. ``rustc``: the output of ``rustc -vV`` (release, commit hash, host triple, LLVM version),
   plus a ``rustc-wrapper-blake3:`` line when ``RUSTC`` is neither the sysroot's compiler nor
   rustup's proxy (a script in front of the compiler, keyed by its text) and a
   ``target-cpu-native:`` line listing the target features ``-C target-cpu=native`` enables on
   this machine when the compilation asks for it.
3. ``sysroot``: each file in ``<sysroot>/lib/rustlib/<target>/lib`` (the standard library the
   crate links against): its name and BLAKE3. Cached per rustc binary, as it rarely changes.
4. ``args``: the arguments in order, minus those that name where outputs go or how diagnostics
   are drawn (``--out-dir``, ``-o``, ``--diagnostic-width``, ``--color``) and minus ``--extern``
   paths (item 7 covers them); every absolute path under a root is in portable form
   (:mod:`larder.client.paths`), so the checkout, target directory and ``CARGO_HOME`` may live
   anywhere; last, for a crate compiled in its own directory, the name its outputs give that
   directory (``--remap-path-prefix=@LARDER:CWD@=/larder/crate/serde-1.0.0``).
5. ``sources``: every file a ``--emit=dep-info`` run of the same command lists (the crate's
   modules, ``include!``/``include_str!``/``include_bytes!`` files, including those under
   ``OUT_DIR``): its portable path and BLAKE3.
6. ``env_deps``: every variable read through ``env!``/``option_env!`` (named by the dep-info's
   ``# env-dep:`` lines) with its value in this environment, or null when unset; values in
   portable form.
7. ``externs``: every ``--extern``: its name and the BLAKE3 of the file it points to (the
   dependency's ``.rlib``/``.rmeta``), or null for a sysroot crate named without a path. A
   dependency's own inputs thus reach this key through its output.
8. ``cargo_env``: the package metadata cargo sets (``CARGO_PKG_*`` except paths,
   ``CARGO_CRATE_NAME``), ``RUSTC_BOOTSTRAP`` and ``RUSTC_FORCE_RUSTC_VERSION``; then every
   variable the package's build script set (``cargo:rustc-env=NAME=VALUE``), value in portable
   form: a proc-macro may read it while it expands, which no dep-info reports.
9. ``out_dir``: what a build script generated: each file under ``$OUT_DIR`` by relative path
   and BLAKE3 (a symlink by its target, and the BLAKE3 of the file it leads to).
10. ``native``: each ``-l static=NAME`` library found as ``libNAME.a`` in a ``-L`` directory, by
    name and BLAKE3 (rustc bundles it into the rlib), or null when not found; and every static
    archive and crate file in a ``-L`` directory under a root, by portable path and BLAKE3
    (what ``#[link(kind = "static")]`` or ``extern crate`` finds without an argument).
11. ``link``, only for linked crate types (``bin``, ``dylib``, ``cdylib``, ``proc-macro``; other
    documents have no such field): the linker command rustc ran, in portable form, the
    linker's identity, every file the link reads (every crate's rlib, native libraries as the
    linker finds them on the ``-L`` paths, start files, scripts) and the variables the driver
    reads, as :mod:`larder.client.linker` describes. Item 7 already covers ``--extern``
    proc-macro libraries, which rustc loads rather than links.

**Direct mode.** Running rustc for items 5 and 6 costs a crate's parse and macro expansion. So
each upload also records, under a *direct key*, which files and variables the dep-info run
named (portable paths and variable names, no contents), and for a linked crate the link line
(item 11 can only be known from a link, so a linked crate is found through direct entries
only). The direct key is the BLAKE3 of the same kind of document with format
``larder-rustc-direct/1``, items 2-4 and 7-10, and ``input``: the crate root's portable path
and BLAKE3. A later compilation with the same direct key hashes the
recorded files and reads the recorded variables *on its own machine* and computes the full key
from them; the server never supplies a key, only a list of names to look at, so a wrong list
can only cause a miss. It is not trusted further: a listed file must be a regular file under the
working directory, the target directory or a directory of ``CARGO_HOME`` (``registry``, ``git``,
``vendor``: not its credentials; anything else makes the entry unusable), and a recorded link
line must name the linker the compilation itself selects
(:meth:`larder.client.shim.Invocation.link_item`). Any change that could make rustc read other
files changes a file that is hashed (the crate root, a module declaring ``mod``, an ``env!``
value naming a path).

What is left out, and why: the rustc path (item 2 identifies the compiler), the working
directory and target directory (portable form), ``CARGO_MANIFEST_DIR``, ``CARGO_PRIMARY_PACKAGE``
and other variables rustc only sees through ``env!`` (item 6 has them exactly when the crate
reads them), and timestamps. A compiled output that still contains one of this machine's roots
is never uploaded (see :mod:`larder.client.shim`), so portable keys cannot hand out an rlib that
embeds another machine's paths.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import blake3

from larder.client import depinfo
from larder.client.args import Compilation
from larder.client.digests import file_digest
from larder.client.paths import Roots, remapped_below, user_remaps
from larder.protocol.rustc import DirectEntry

KEY_FORMAT = "larder-rustc/2"
DIRECT_FORMAT = "larder-rustc-direct/1"

# Item 4: flags that say where outputs go or how diagnostics look, not what is compiled.
_DROPPED_FLAGS = frozenset({"--out-dir", "-o", "--diagnostic-width", "--color"})
# Flags left out of the dep-info run (it writes one file and nothing else).
_DEPINFO_DROPPED = frozenset({"--emit", "--out-dir", "-o", "--error-format", "--json", "--color"})
_CARGO_ENV = (
    "CARGO_PKG_NAME",
    "CARGO_PKG_VERSION",
    "CARGO_PKG_VERSION_MAJOR",
    "CARGO_PKG_VERSION_MINOR",
    "CARGO_PKG_VERSION_PATCH",
    "CARGO_PKG_VERSION_PRE",
    "CARGO_PKG_AUTHORS",
    "CARGO_PKG_DESCRIPTION",
    "CARGO_PKG_HOMEPAGE",
    "CARGO_PKG_REPOSITORY",
    "CARGO_PKG_LICENSE",
    "CARGO_PKG_LICENSE_FILE",
    "CARGO_PKG_RUST_VERSION",
    "CARGO_PKG_README",
    "CARGO_CRATE_NAME",
    "RUSTC_BOOTSTRAP",
    # rustc reads it for the version it writes into metadata and symbol hashes (no dep-info
    # line names it)
    "RUSTC_FORCE_RUSTC_VERSION",
)


class KeyUnavailable(Exception):
    """The key could not be computed (a file vanished, the dep-info run failed...)."""


class Base(NamedTuple):
    """Key items 2-4 and 7-10: everything but what the dep-info run names."""

    rustc: str  # 2
    sysroot: list[tuple[str, str]]  # 3
    args: list[str]  # 4
    externs: list[tuple[str, str | None]]  # 7
    cargo_env: list[tuple[str, str]]  # 8
    out_dir: list[tuple[str, str]]  # 9
    native: list[tuple[str, str | None]]  # 10


def _digest(document: dict[str, object]) -> tuple[str, bytes]:
    data = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    return blake3.blake3(data).hexdigest(), data


class KeyInputs(NamedTuple):
    """Everything the key covers (see the module docstring for each item)."""

    base: Base
    sources: list[tuple[str, str]]  # 5
    env_deps: list[tuple[str, str | None]]  # 6
    link: dict[str, object] | None = None  # 11, linked crates only

    def document(self) -> bytes:
        return _digest(self._fields_dict())[1]

    def key(self) -> str:
        return _digest(self._fields_dict())[0]

    def _fields_dict(self) -> dict[str, object]:
        fields: dict[str, object] = {
            "format": KEY_FORMAT,
            **self.base._asdict(),
            "sources": self.sources,
            "env_deps": self.env_deps,
        }
        if self.link is not None:
            fields["link"] = self.link
        return fields


def portable_args(compilation: Compilation, roots: Roots) -> list[str]:
    """Item 4: the arguments with output locations dropped and paths made portable, and where
    ``CWD`` is remapped to when not ``.`` (the crate directory's name is in the outputs)."""
    out: list[str] = []
    for flag, value in compilation.flags:
        if flag in _DROPPED_FLAGS:
            continue
        if flag == "--extern" and value is not None:
            value = value.partition("=")[0]
        out.append(flag if value is None else f"{flag}={roots.portable(value)}")
    if compilation.input is not None:
        out.append(roots.portable_path(compilation.input))
    # Where the outputs name the crate's directory: a remap of the user's own from above it
    # wins over the shim's, and then where the crate sits below that directory counts.
    remaps = user_remaps(compilation.values("--remap-path-prefix"))
    cwd = remapped_below([path for name, path in roots.spellings if name == "CWD"], remaps)
    if cwd is not None:
        out.append(f"--remap-path-prefix=@LARDER:CWD@={cwd[1]}")
    elif roots.cwd_remap not in (".", ""):
        out.append(f"--remap-path-prefix=@LARDER:CWD@={roots.cwd_remap}")
    elif roots.cwd_remap == "":  # not remapped: its outputs name it, so they serve it alone
        out.extend(f"--larder-crate-dir={path}" for name, path in roots.spellings if name == "CWD")
    # Likewise the target directory and CARGO_HOME: a remap of the user's own from another root
    # above them ($PWD=/build) writes where they sit below it (/build/target). (From above every
    # root, $HOME=~, the remapped form names this machine and is looked for before uploading.)
    spelled = [path for _, path in roots.spellings]
    for name, path in roots.roots:
        below = remapped_below([path], remaps) if name in ("TARGET", "CARGO_HOME") else None
        if below is not None and any(
            below[0] == r or below[0].startswith(r + "/") for r in spelled
        ):
            out.append(f"--remap-path-prefix=@LARDER:{name}@={below[1]}")
    return out


def extern_digests(compilation: Compilation, cwd: Path) -> list[tuple[str, str | None]]:
    """Item 7: each ``--extern`` by name, with the BLAKE3 of its file."""
    found: list[tuple[str, str | None]] = []
    for value in compilation.values("--extern"):
        name, sep, path = value.partition("=")
        found.append((name, file_digest(cwd / path) if sep else None))
    return found


def cargo_env(environ: dict[str, str], roots: Roots) -> list[tuple[str, str]]:
    """Item 8."""
    fixed = [(name, environ[name]) for name in _CARGO_ENV if name in environ]
    extra = [name for name in build_script_env(environ) if name in environ]
    return fixed + [(name, roots.portable(environ[name])) for name in extra]


def build_script_env(environ: dict[str, str]) -> list[str]:
    """The variables the package's build script set for its compilations, as it printed them
    (``cargo:rustc-env=NAME=VALUE`` or ``cargo::rustc-env=...``) into the ``output`` file cargo
    keeps beside ``OUT_DIR``; sorted, without those item 8 already names."""
    out_dir = environ.get("OUT_DIR")
    if not out_dir:
        return []
    try:
        text = (Path(out_dir).parent / "output").read_text(errors="replace")
    except OSError:
        return []
    names = set()
    for line in text.splitlines():
        for prefix in ("cargo::rustc-env=", "cargo:rustc-env="):
            if line.startswith(prefix):
                name = line[len(prefix) :].partition("=")[0]
                if name and name not in _CARGO_ENV:
                    names.add(name)
    return sorted(names)


def tree_digests(root: Path) -> list[tuple[str, str]]:
    """Item 9: files (and symlinks) under ``root``, by relative path."""
    entries: list[tuple[str, str]] = []
    for directory, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(Path(directory, d))]):
            path = Path(directory, name)
            relative = path.relative_to(root).as_posix()
            if path.is_symlink():  # by its target, and the content there (a system library)
                content = file_digest(path) if path.is_file() else ""
                entries.append((relative, f"symlink:{os.readlink(path)}:{content}"))
            elif path.is_file():
                entries.append((relative, file_digest(path)))
    return entries


def search_dirs(compilation: Compilation, cwd: Path) -> list[tuple[str, Path]]:
    """Each ``-L`` directory with its kind (``native``, ``crate``, ``all``, ...)."""
    dirs = []
    for value in compilation.values("-L"):
        kind, sep, path = value.partition("=")
        if not sep:
            path, kind = value, "all"
        dirs.append((kind, cwd / path))
    return dirs


#: Files of a project's own ``-L`` directory that rustc may read without any argument naming
#: them: static archives (``#[link(name = "x", kind = "static")]`` bundles ``libx.a``) and
#: crates (``extern crate x;`` finds ``libx.rlib``).
_FOUND_BY_SEARCH = (".a", ".rlib", ".rmeta", ".so")
#: The most such files one directory may hold; past it the compilation gets no key.
MAX_SEARCHED_FILES = 256


def native_digests(
    compilation: Compilation, cwd: Path, roots: Roots
) -> list[tuple[str, str | None]]:
    """Item 10: static native libraries an rlib bundles, and what rustc may find by searching.

    Each ``-l static=NAME`` and ``-l NAME`` without a kind (a ``#[link(kind = "static")]`` in
    the source bundles that too): the first ``libNAME.a`` (``NAME:RENAME``: ``libRENAME.a``;
    ``+verbatim``: the file ``NAME`` itself) on the ``native``/``all`` search path, by name and
    BLAKE3, or null when not found. Then, for each ``-L`` directory under a root (the project's
    own: a vendored library, a build script's ``OUT_DIR``; system directories are left out like
    system headers), every
    static archive and crate file in it (``search:<portable path>``, BLAKE3): a library named
    only in the source (``#[link]``) or a crate named only by ``extern crate`` is found there.
    """
    found: list[tuple[str, str | None]] = []
    searched = search_dirs(compilation, cwd)
    native_dirs = [path for kind, path in searched if kind in ("native", "all")]
    for value in compilation.values("-l"):
        kind, sep, name = value.partition("=")
        if not sep:  # no kind: the source's #[link(kind = "static")] may make it bundled
            kind, name = "", kind
        if kind and (not kind.startswith("static") or "-bundle" in kind):
            continue
        name, _, rename = name.partition(":")  # NAME:RENAME links libRENAME.a for NAME
        name = rename or name
        file_name = name if "+verbatim" in kind else f"lib{name}.a"
        digest = None
        for directory in native_dirs:
            candidate = directory / file_name
            if candidate.is_file():
                digest = file_digest(candidate)
                break
        found.append((name, digest))
    for kind, directory in searched:
        if kind == "dependency" or not directory.is_dir():
            continue
        portable = roots.portable_path(os.path.normpath(directory))
        if portable == os.path.normpath(directory):
            continue  # not the project's own
        names = sorted(n for n in os.listdir(directory) if n.endswith(_FOUND_BY_SEARCH))
        if len(names) > MAX_SEARCHED_FILES:
            raise KeyUnavailable(f"{len(names)} libraries in the search directory {directory}")
        for name in names:
            if (directory / name).is_file():
                found.append((f"search:{portable}/{name}", file_digest(directory / name)))
    return found


def depinfo_run(
    rustc: str, compilation: Compilation, cwd: Path, scratch: Path, environ: dict[str, str]
) -> depinfo.DepInfo:
    """Item 5 and 6: run rustc with ``--emit=dep-info`` only and read what it lists."""
    import subprocess  # only here: the direct-mode hit path never starts a process

    target = scratch / f".larder-depinfo-{os.getpid()}-{os.urandom(4).hex()}.d"
    args = [*compilation.argv(without=_DEPINFO_DROPPED), f"--emit=dep-info={target}"]
    try:
        done = subprocess.run(
            [rustc, *args],
            cwd=cwd,
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
            close_fds=False,  # cargo's jobserver pipes
        )
        if done.returncode != 0:
            raise KeyUnavailable(f"dep-info run exited with {done.returncode}")
        return depinfo.parse(target.read_text())
    except OSError as exc:
        raise KeyUnavailable(f"dep-info run failed: {exc}") from None
    finally:
        target.unlink(missing_ok=True)


def base_inputs(
    *,
    rustc_version: str,
    sysroot: list[tuple[str, str]],
    compilation: Compilation,
    roots: Roots,
    cwd: Path,
    environ: dict[str, str],
) -> Base:
    """Items 2-4 and 7-10."""
    try:
        out_dir = environ.get("OUT_DIR")
        return Base(
            rustc=rustc_version,
            sysroot=sysroot,
            args=portable_args(compilation, roots),
            externs=extern_digests(compilation, cwd),
            cargo_env=cargo_env(environ, roots),
            out_dir=tree_digests(Path(out_dir)) if out_dir and Path(out_dir).is_dir() else [],
            native=native_digests(compilation, cwd, roots),
        )
    except OSError as exc:
        raise KeyUnavailable(f"cannot read a key input: {exc}") from None


def direct_key(base: Base, compilation: Compilation, roots: Roots, cwd: Path) -> str:
    """The direct key: the base plus the crate root's portable path and content."""
    assert compilation.input is not None
    try:
        digest = file_digest(cwd / compilation.input)
    except OSError as exc:
        raise KeyUnavailable(f"cannot read the crate root: {exc}") from None
    document = {
        "format": DIRECT_FORMAT,
        **base._asdict(),
        "input": [roots.portable_path(compilation.input), digest],
    }
    return _digest(document)[0]


def partial(base: Base, compilation: Compilation, roots: Roots, cwd: Path) -> dict[str, object]:
    """What is known of a key without a dep-info run or a link (to explain a linked crate's
    miss): items 1-4 and 7-10, and ``input``, the crate root's portable path and BLAKE3."""
    assert compilation.input is not None
    try:
        digest = file_digest(cwd / compilation.input)
    except OSError as exc:
        raise KeyUnavailable(f"cannot read the crate root: {exc}") from None
    return {
        "format": KEY_FORMAT,
        **base._asdict(),
        "input": [roots.portable_path(compilation.input), digest],
    }


def complete(
    base: Base,
    sources: list[str],
    env_names: list[str],
    roots: Roots,
    cwd: Path,
    environ: dict[str, str],
    link: dict[str, object] | None = None,
) -> KeyInputs:
    """Items 5 and 6 from local paths (as dep-info lists them) and variable names; item 11."""
    try:
        digests = [(roots.portable_path(p), file_digest(cwd / p)) for p in sources]
    except OSError as exc:
        raise KeyUnavailable(f"cannot read a source file: {exc}") from None
    env = [
        (name, None if environ.get(name) is None else roots.portable(environ[name]))
        for name in sorted(set(env_names))
    ]
    return KeyInputs(base, digests, env, link)


def direct_entry(deps: depinfo.DepInfo, roots: Roots, link: list[str] | None = None) -> DirectEntry:
    """What to record under the direct key after a dep-info run (and a link)."""
    sources = [roots.portable_path(p) for p in deps.files]
    return DirectEntry(sources, [n for n, _ in deps.env], list(link or []))


def from_direct_entry(
    base: Base,
    entry: DirectEntry,
    roots: Roots,
    cwd: Path,
    environ: dict[str, str],
    link: dict[str, object] | None = None,
) -> KeyInputs:
    """The full key inputs for a recorded entry, from this machine's files and environment
    (item 11 computed by the caller from the entry's link line)."""
    sources = [roots.local(p) for p in entry.sources]
    within, cargo_home = _named_places(roots, cwd)
    for source in sources:
        path = os.path.normpath(os.path.join(cwd, source))
        if not path.startswith(within) and not _in_a_directory_of(path, cargo_home):
            # The cache names what to hash: only the project's own files, never the
            # machine's (/etc/shadow, ~/.ssh, /dev/zero), whatever it says.
            raise KeyUnavailable(f"the entry names {source!r}, outside the project")
        twin = module_twin(source)
        if twin is not None and os.path.lexists(cwd / twin):
            # rustc refuses a module found as both name.rs and name/mod.rs (E0761): only a
            # real run says what this checkout's sources mean.
            raise KeyUnavailable(f"{source} and {twin} both exist")
    return complete(base, sources, entry.env, roots, cwd, environ, link)


def check_link_places(
    paths: Iterable[str], roots: Roots, cwd: Path, sysroot: str, named: Iterable[str]
) -> None:
    """Refuse (:class:`KeyUnavailable`) a recorded link line naming a file or a search
    directory (``paths``, local and not rustc's temporary ones) outside the places a direct
    entry may name, the sysroot, and what the compilation's own arguments name (``named``:
    its ``-L`` directories and ``-C link-arg`` files): the key reads them, and the lookups that
    follow would tell the cache whether such a file exists."""
    within, cargo_home = _named_places(roots, cwd)
    allowed = (*within, os.path.normpath(sysroot).rstrip("/") + "/")
    own = {os.path.normpath(os.path.join(cwd, path)) for path in named}
    for path in paths:
        normal = os.path.normpath(os.path.join(cwd, path))
        if normal in own or (normal + "/").startswith(allowed):
            continue
        if not _in_a_directory_of(normal, cargo_home):
            raise KeyUnavailable(f"the entry's link line names {path!r}, outside the project")


def _named_places(roots: Roots, cwd: Path) -> tuple[tuple[str, ...], str | None]:
    """Where a direct entry may name a file, each with a trailing ``/``: anywhere under the
    working directory and the ``CWD`` and ``TARGET`` roots; and ``CARGO_HOME``, where only its
    directories count (``registry``, ``git``, a ``vendor`` of the user's; not the files
    directly in it, its credentials and configuration)."""
    by_name = dict(roots.roots)
    places = [os.path.normpath(cwd)]
    places += [by_name[name] for name in ("CWD", "TARGET") if name in by_name]
    cargo_home = by_name.get("CARGO_HOME")
    return (
        tuple(place.rstrip("/") + "/" for place in places),
        cargo_home.rstrip("/") + "/" if cargo_home else None,
    )


def _in_a_directory_of(path: str, parent: str | None) -> bool:
    """Whether ``path`` is in a directory under ``parent`` (not a file directly in it)."""
    return parent is not None and path.startswith(parent) and "/" in path[len(parent) :]


def module_twin(source: str) -> str | None:
    """The other file ``mod name;`` may load for the module in ``source``: ``name/mod.rs`` for
    ``name.rs`` and ``name.rs`` for ``name/mod.rs``; None for a file that is not Rust."""
    path = PurePosixPath(source)
    if path.suffix != ".rs":
        return None
    if path.name == "mod.rs":
        return str(path.parent.with_name(path.parent.name + ".rs")) if path.parent.name else None
    return str(path.with_suffix("") / "mod.rs")


def compute(
    *,
    rustc_version: str,
    sysroot: list[tuple[str, str]],
    compilation: Compilation,
    deps: depinfo.DepInfo,
    roots: Roots,
    cwd: Path,
    environ: dict[str, str],
) -> KeyInputs:
    """Every input of the key, after a dep-info run."""
    base = base_inputs(
        rustc_version=rustc_version,
        sysroot=sysroot,
        compilation=compilation,
        roots=roots,
        cwd=cwd,
        environ=environ,
    )
    return complete(base, list(deps.files), [n for n, _ in deps.env], roots, cwd, environ)
