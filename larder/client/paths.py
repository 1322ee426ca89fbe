"""Machine-specific roots and the portable form of paths under them.

A compilation names paths under a few roots that differ between machines but not between the
builds that should share a cache entry:

* ``CWD``: the directory cargo runs rustc in (the workspace root, or a crate's own root);
* ``TARGET``: cargo's target directory (found from ``--out-dir`` and ``--target`` by cargo's
  layout, :func:`find_target_dir`);
* ``CARGO_HOME``: ``$CARGO_HOME`` or ``~/.cargo`` (registry and git checkouts);
* ``WORKSPACE``: for a crate cargo compiles outside the workspace (a registry or vendored
  dependency), the workspace its default target directory sits in (:func:`workspace_dir`),
  for portable text only (no remap of its own).

:meth:`Roots.portable` replaces a root prefix with a placeholder (``@LARDER:TARGET@``) and
:meth:`Roots.local` puts this machine's root back; the most specific (longest) root wins. For the
outputs themselves the shim passes ``--remap-path-prefix`` for each root (``CWD`` to ``.``,
``TARGET`` to ``/larder/target``, ``CARGO_HOME`` to ``/larder/cargo-home``), so that rlibs, rmeta
files and debug info are byte-identical whichever directory they were built in. A crate cargo
compiles in its own directory (registry, git, vendored: cargo names its root file by absolute
path) has ``CWD`` remapped to ``/larder/crate/<directory name>`` instead
(:func:`crate_dir_remap`), so its panics and debug info name it (``serde-1.0.0/src/de.rs``, not
``./src/de.rs``) whichever registry or vendor directory holds it. rustc's diagnostics are
remapped too; :meth:`Roots.shown` puts this machine's roots back in what the shim prints.

A link line names two more machine-specific places (:mod:`larder.client.linkline`): the
toolchain's ``SYSROOT`` and rustc's temporary directory ``RUSTC_TMP``. :meth:`Roots.extended`
adds such roots for portable text only; they get no ``--remap-path-prefix``.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

PLACEHOLDER = "@LARDER:{}@"
REMAP_TO = {"CWD": ".", "TARGET": "/larder/target", "CARGO_HOME": "/larder/cargo-home"}
_PLACEHOLDER = re.compile(r"@LARDER:([A-Z_]+)@")
#: Where a crate compiled in its own directory is remapped to (:func:`crate_dir_remap`).
CRATE_REMAP = "/larder/crate/"
#: Characters a JSON string escapes.
_JSON_ESCAPED = re.compile(r'["\\\x00-\x1f]')


#: A build script's directory under ``<profile>/build``: the package and cargo's 16-hex hash.
_BUILD_UNIT = re.compile(r".+-[0-9a-f]{16}")


def _profile_dir(out_dir: Path) -> Path | None:
    """The ``<profile>`` directory of an ``--out-dir`` laid out as cargo does, else None:
    ``<profile>/deps`` (libraries, binaries, tests), ``<profile>/examples`` and
    ``<profile>/build/<package>-<hash>`` (build scripts)."""
    if out_dir.name in ("deps", "examples"):
        return out_dir.parent
    if out_dir.parent.name == "build" and _BUILD_UNIT.fullmatch(out_dir.name):
        return out_dir.parent.parent
    return None


def _triple_dir_name(target: str) -> str:
    """The directory cargo names after ``--target``: the triple, or a target spec file's stem."""
    return Path(target).stem if target.endswith(".json") else target


def find_target_dir(out_dir: Path, target: str | None = None) -> Path:
    """Cargo's target directory for an ``--out-dir`` and the compilation's ``--target``.

    By layout first: ``<target dir>/[<triple>/]<profile>/...`` (:func:`_profile_dir`), the triple
    present when rustc is given ``--target``. A target directory cargo did not create (made
    beforehand, a mounted volume, a symlink) has no ``CACHEDIR.TAG``, and with ``--target``
    cargo writes one in the triple's directory too, so the tag alone cannot tell. Otherwise the
    nearest ancestor holding ``CACHEDIR.TAG``, else ``out_dir`` itself.
    """
    profile = _profile_dir(out_dir)
    if profile is not None:
        root = profile.parent
        if target is not None and root.name == _triple_dir_name(target):
            root = root.parent
        return root
    for candidate in (out_dir, *out_dir.parents):
        if (candidate / "CACHEDIR.TAG").is_file():
            return candidate
    return out_dir


def workspace_dir(target_dir: Path | None, cwd: Path) -> Path | None:
    """The workspace a compilation run outside it belongs to, when cargo's default target
    directory says so: ``<dir>`` for ``<dir>/target`` beside ``<dir>/Cargo.toml``. None when that
    is the working directory itself (a workspace member, whose root is ``CWD``) or the target
    directory is elsewhere (``CARGO_TARGET_DIR``). A root with no remap of its own: a user's
    ``--remap-path-prefix=$PWD=/build`` is keyed the same from every checkout for the registry
    and vendored crates cargo compiles in their own directories."""
    if target_dir is None or target_dir.name != "target":
        return None
    workspace = target_dir.parent
    if not (workspace / "Cargo.toml").is_file():
        return None
    if os.path.realpath(workspace) == os.path.realpath(cwd):
        return None
    return workspace


def default_cargo_home(environ: dict[str, str] | os._Environ[str]) -> Path:
    home = environ.get("CARGO_HOME")
    return Path(home) if home else Path.home() / ".cargo"


#: Top-level directories that are the system's, never a checkout, target directory or
#: ``CARGO_HOME`` of their own (``/app``, ``/src``, ``/target`` in a container are).
SYSTEM_DIRS = frozenset(
    {
        "bin", "boot", "dev", "etc", "home", "lib", "lib32", "lib64", "libx32", "media", "mnt",
        "nix", "opt", "proc", "root", "run", "sbin", "sys", "tmp", "usr", "var",
    }
)  # fmt: skip


def _usable(path: Path) -> bool:
    """Whether ``path`` is specific enough to be a root: never ``/``, nor a top-level system
    directory (:data:`SYSTEM_DIRS`); ``/app`` or ``/target``, as containers lay them out, are."""
    if not path.is_absolute() or len(path.parts) < 2:
        return False
    return len(path.parts) > 2 or path.parts[1] not in SYSTEM_DIRS


#: What a root may follow, as the end of the text before it: not a path (``/a/ws`` is no root in
#: ``/x/a/ws``, nor ``/app``, a container's checkout, in ``crates/app/src``), but the start of a
#: word, a one-letter flag starting one (``-L/app``, ``-B/app``), a colour change (``\x1b[0m``,
#: ``\u001b[0m`` as JSON writes it), a line break or tab as JSON writes it (``\n``) or
#: ``file://``. Path characters are any letters (``josé/app`` is a path), digits, ``_.+~/-``.
_ROOT_MAY_FOLLOW = re.compile(
    r"(?:^|[^\w.+~/-]|(?<!\\)\\[nrt])(?:-[A-Za-z])?$|(?:\x1b|\\u001b)\[[0-9;]*m$|file://$"
)
#: How far back :data:`_ROOT_MAY_FOLLOW` looks.
_CONTEXT = 24


@lru_cache(maxsize=16)
def _finder(swaps: tuple[tuple[str, str], ...]) -> tuple[re.Pattern[str], dict[str, str]]:
    """The regex that finds any path of ``swaps`` (``(path, replacement)`` pairs, longest path
    first) and each path's replacement (built once per set): a path matches only as whole
    components (``/a/ws`` is not in ``/a/ws2``)."""
    alternatives = "|".join(re.escape(path) for path, _ in swaps)
    return re.compile(rf"(?:{alternatives})(?![\w.+~-])"), dict(swaps)


def _swap_paths(text: str, swaps: tuple[tuple[str, str], ...]) -> str:
    """``text`` with each path of ``swaps`` replaced where it starts a path, after what
    :data:`_ROOT_MAY_FOLLOW` allows (``/a/ws`` is not replaced in ``/x/a/ws``)."""
    if not swaps:
        return text
    pattern, replacements = _finder(swaps)

    def replace(match: re.Match[str]) -> str:
        start = match.start()
        if _ROOT_MAY_FOLLOW.search(text, max(0, start - _CONTEXT), start) is None:
            return match.group(0)  # inside another path
        return replacements[match.group(0)]

    return pattern.sub(replace, text)


class Roots(NamedTuple):
    """This compilation's roots, by name, as absolute normalised paths."""

    roots: tuple[tuple[str, str], ...]
    #: A root's other spelling where it is reached through a symlink (its real path): rustc
    #: resolves some paths (an ``--extern`` on the link line), ``os.getcwd()`` does too, so the
    #: same root comes in both spellings. Both become its placeholder and get its remap; the
    #: placeholder is put back as the root's own spelling.
    aliases: tuple[tuple[str, str], ...] = ()
    #: What ``CWD`` (and its aliases) is remapped to (:func:`crate_dir_remap`).
    cwd_remap: str = "."

    @classmethod
    def of(cls, **paths: Path | None) -> Roots:
        found = {
            name: os.path.normpath(path)
            for name, path in paths.items()
            if path is not None and _usable(Path(path))
        }
        # Longest first, so the most specific root claims a path.
        ordered = sorted(found.items(), key=lambda item: len(item[1]), reverse=True)
        spelled = set(found.values())
        aliases = []
        for name, path in ordered:
            real = os.path.realpath(path)
            if real not in spelled and _usable(Path(real)):
                aliases.append((name, real))
                spelled.add(real)
        return cls(tuple(ordered), tuple(sorted(aliases, key=lambda a: len(a[1]), reverse=True)))

    @property
    def spellings(self) -> tuple[tuple[str, str], ...]:
        """Every root and alias, longest first."""
        both = self.roots + self.aliases
        return tuple(sorted(both, key=lambda item: len(item[1]), reverse=True))

    def extended(self, **paths: Path | None) -> Roots:
        """These roots and ``paths`` (placeholders without a remap, e.g. ``SYSROOT``)."""
        known: dict[str, Path | None] = {name: Path(path) for name, path in self.roots}
        return Roots.of(**{**known, **paths})._replace(cwd_remap=self.cwd_remap)

    def portable(self, text: str) -> str:
        """``text`` with every root replaced by its placeholder."""
        return _swap_paths(
            text, tuple((path, PLACEHOLDER.format(name)) for name, path in self.spellings)
        )

    def local(self, text: str) -> str:
        """``text`` with every placeholder replaced by this machine's root."""
        by_name = dict(self.roots)

        def expand(match: re.Match[str]) -> str:
            name = match.group(1)
            return by_name.get(name) or REMAP_TO.get(name) or match.group(0)

        return _PLACEHOLDER.sub(expand, text)

    def shown(self, text: str) -> str:
        """``text`` as a plain build on this machine prints it: what the shim's own remaps
        wrote (``/larder/target/...``, ``/larder/cargo-home/...``, ``/larder/crate/<name>/...``
        in a diagnostic) under this machine's root, found as :meth:`portable` finds a root.
        A root that JSON would have to escape (``"``, ``\\``, control characters) is left as
        remapped: rustc's JSON messages carry these paths in strings."""
        roots = dict(self.roots)
        remapped = {name: REMAP_TO[name] for name in ("TARGET", "CARGO_HOME")}
        if self.cwd_remap.startswith(CRATE_REMAP):
            remapped["CWD"] = self.cwd_remap
        swaps = [
            (to, roots[name])
            for name, to in remapped.items()
            if name in roots and not _JSON_ESCAPED.search(roots[name])
        ]
        return _swap_paths(text, tuple(sorted(swaps, key=lambda s: len(s[0]), reverse=True)))

    def portable_path(self, path: str) -> str:
        """A path argument in portable form (relative paths are kept as given)."""
        if not os.path.isabs(path):
            return path
        return self.portable(os.path.normpath(path))

    def remap_flags(self) -> list[str]:
        """``--remap-path-prefix`` flags; rustc lets the last match win, so specific last."""
        flags = []
        for name, path in sorted(self.spellings, key=lambda item: len(item[1])):
            if name not in REMAP_TO:
                continue
            if name == "CWD" and not self.cwd_remap:
                continue  # kept as it is (crate_dir_remap)
            to = self.cwd_remap if name == "CWD" else REMAP_TO[name]
            flags.append(f"--remap-path-prefix={path}={to}")
        return flags


def crate_dir_remap(crate_root: str | None, cwd: Path, lints_capped: bool = True) -> str:
    """What ``CWD`` is remapped to: ``/larder/crate/<directory name>`` when cargo compiles a
    dependency from a registry, git or vendored source in its own directory (it names the root
    file by absolute path and caps its lints); ``""`` (not remapped) for a path dependency
    outside the workspace, the user's own code (lints not capped, root named by absolute path,
    compiled in its own directory), whose diagnostics must name the real file, as a plain build
    does (``./src/lib.rs`` would read as the workspace's own; cargo's ``-C metadata`` holds its
    path, so it is reused in its own place only); else ``.``: a workspace member (named
    relative to the workspace root). Also ``.`` for a name with ``=``, which rustc would split
    the remap at."""
    if crate_root is not None and os.path.isabs(crate_root) and not lints_capped:
        return ""
    if crate_root is None or not os.path.isabs(crate_root) or not lints_capped:
        return "."
    inside = os.path.normpath(crate_root).startswith(os.path.normpath(cwd).rstrip("/") + "/")
    return f"{CRATE_REMAP}{cwd.name}" if inside and cwd.name and "=" not in cwd.name else "."


def user_remaps(values: list[str]) -> list[tuple[str, str]]:
    """``--remap-path-prefix`` values (``FROM=TO``) as ``(FROM, TO)``, in order; ``FROM``
    without a trailing ``/``. rustc splits at the last ``=``."""
    remaps = []
    for value in values:
        source, sep, target = value.rpartition("=")
        source = source.rstrip("/")
        if sep and source:
            remaps.append((source, target))
    return remaps


def remap_join(target: str, rest: str) -> str:
    """What rustc writes for a path under a remap's ``FROM``: ``TO`` and the rest joined by path
    components (``~/`` and ``a`` is ``~/a``; an empty ``TO`` leaves the rest relative)."""
    rest = rest.lstrip("/")
    if not rest:
        return target
    if not target or target.endswith("/"):
        return target + rest
    return f"{target}/{rest}"


def remapped_below(spellings: list[str], remaps: list[tuple[str, str]]) -> tuple[str, str] | None:
    """``(FROM, what it writes)`` for the user's remap that maps a directory *above* a root
    spelled as ``spellings`` (the last that matches wins, as in rustc, and the user's come after
    the shim's): ``TO`` and the rest of the path (``/build/vendor/itoa-1.0.1``), which then
    differs with where the root sits below that directory. None when none does, or the last
    that matches maps the root itself (which the flags say)."""
    for source, target in reversed(remaps):
        for path in spellings:
            if path == source:
                return None
            if path.startswith(source + "/"):
                return source, remap_join(target, path[len(source) :])
    return None


def logical_cwd(cwd: Path, environ: dict[str, str]) -> Path:
    """The working directory as cargo names it: ``os.getcwd()`` resolves symlinks, cargo does
    not (a registry crate under a symlinked ``CARGO_HOME``, a checkout reached through one), so
    the directory among ``CARGO_MANIFEST_DIR`` and its parents that is ``cwd``, else ``cwd``."""
    manifest_dir = environ.get("CARGO_MANIFEST_DIR")
    if not manifest_dir or not os.path.isabs(manifest_dir):
        return cwd
    for candidate in (Path(manifest_dir), *Path(manifest_dir).parents):
        if os.path.realpath(candidate) == str(cwd):
            return candidate
    return cwd
