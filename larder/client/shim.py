"""``larder-rustc``: cargo's ``RUSTC_WRAPPER`` that fetches compilations from a larder cache.

Usage: ``RUSTC_WRAPPER=larder-rustc cargo build``; cargo runs ``larder-rustc RUSTC ARGS...``.
Also ``larder-rustc --stats [--json]``, ``larder-rustc --zero-stats``, ``larder-rustc explain
[CRATE] [--json]`` (why the last build's crates missed: :mod:`larder.client.explain`) and
``larder-rustc --wait-uploads [SECONDS]`` (until the uploads are sent:
:mod:`larder.client.uploads`).

Environment:

* ``LARDER_URL``: the cache, e.g. ``http://larder:8080/main``. Unset: rustc runs untouched.
* ``LARDER_TOKEN``: a token for the cache; with a write token the shim also uploads (a read
  token, for a private cache, only reads: its own claims say so, and no upload is attempted).
* ``LARDER_DISABLE=1``: run rustc untouched.
* ``LARDER_LOG``: a file that gets one line per compilation (crate, key, result, reason, ms,
  and the package: every build script's crate is ``build_script_build``).
* ``LARDER_TIMEOUT``: seconds per network operation (default 5).
* ``LARDER_RESIDENT=0``: no resident process (:mod:`larder.client.resident`); every call loads
  the shim itself.
* ``LARDER_EXPLAIN_SAFE_ENV``: ``env!`` variables (comma-separated, ``NAME*`` a prefix) whose
  values ``explain`` may show and the cache may store in clear; others are hashed.
* ``LARDER_STATE_DIR``: where stats and the toolchain cache live (default
  ``$XDG_CACHE_HOME/larder``); ``LARDER_KEY_DIR``: if set, each key's inputs are written there
  as ``<key>.json``, to compare two machines' keys.

For a compilation the shim computes the key (:mod:`larder.client.key`), asks the cache, and on a hit
writes the outputs atomically into ``--out-dir`` (dep-info rewritten to this machine's paths, modes
as recorded, so binaries stay executable), replays rustc's stdout and stderr and exits 0. On a miss
it runs rustc with ``--remap-path-prefix`` for each root (as it does for every compilation it runs,
so outputs are the same from any directory), passes its output through a line at a time as it comes
(replayed or passed, printed paths name this machine's roots, not the remaps:
:meth:`larder.client.paths.Roots.shown`), takes the key from the dep-info file that compilation
wrote, and with a token queues the outputs, snapshot, for the detached uploader
(:mod:`larder.client.uploads`: blobs, manifest, direct entry, inputs document), refusing any that
still contain one of this machine's root paths. A miss the direct entries could not key (some exist,
none matched) costs a ``--emit=dep-info`` run first, to look up its key; with no direct entry at all
there is nothing under any key and rustc runs once. A miss is explained by comparing its inputs with
those the cache stored for the same crate (:mod:`larder.client.explain`). A linked crate (binary,
proc-macro, dylib, cdylib) it uploads is compiled with ``--print=link-args=FILE`` too, which tells
the shim what the link read (:mod:`larder.client.linkline`, :mod:`larder.client.linker`). Calls that
are not compilations (``-vV``, ``--print``) go straight to rustc with no network traffic.

The cache can slow a build but never break it: every network failure, timeout, 5xx or garbage
answer means a local compilation and a counted error, and after an unreachable server the shim
stays offline for 30 seconds instead of retrying on every crate.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from stat import S_ISREG
from typing import TYPE_CHECKING, BinaryIO, NamedTuple

import blake3

from larder.client import args as rustc_args
from larder.client import depinfo, digests, linkline, toolchain
from larder.client import key as cache_key
from larder.client import stats as stats_mod
from larder.client.leaks import embeds, scan_needles
from larder.client.paths import (
    Roots,
    crate_dir_remap,
    default_cargo_home,
    find_target_dir,
    logical_cwd,
    workspace_dir,
)
from larder.client.probe import cache_enabled, startup_ms
from larder.client.remote import Remote, RemoteError, network_timeout, url_cache_name
from larder.errors import FormatError
from larder.protocol import token_claims
from larder.protocol.rustc import MAX_MANIFEST_SIZE, Manifest, Output, parse_manifest

if TYPE_CHECKING:
    from larder.protocol.inputs import Identity

KEY_ERRORS = (cache_key.KeyUnavailable, OSError, ValueError)
REMOTE_ERRORS = (RemoteError, FormatError, OSError, ValueError)
OFFLINE_SECONDS = 30.0
#: A compilation's lookups (its direct entries' manifests) stop after this many times
#: ``LARDER_TIMEOUT`` in all, however quickly each answer came.
LOOKUP_TIMEOUTS = 3
#: The largest dep-info file a hit restores (it is read whole to put this machine's paths in;
#: one naming thousands of files is well under a megabyte).
MAX_DEPINFO_SIZE = 16 * 1024**2
#: Space a hit leaves free on the output directory's file system, beyond its outputs.
RESTORE_MARGIN = 64 * 1024**2


def _umask() -> int:
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def file_mode(executable: bool) -> int:
    """The mode a restored output gets: what rustc gives the file it writes here (``0o666``,
    or ``0o777`` for an executable, minus this process's umask). The recorded mode is not
    read: a cache could lock the owner out, open the file to others, or leave a binary that
    cargo takes as fresh unable to run."""
    return (0o777 if executable else 0o666) & ~_umask()


def check_room(out_dir: Path, manifest: Manifest) -> None:
    """Refuse a manifest whose outputs would not fit in the output directory's free space
    (with :data:`RESTORE_MARGIN` to spare) or whose dep-info is past
    :data:`MAX_DEPINFO_SIZE`, before anything is downloaded: a blob is checked only once
    written, and a cache declaring gigabytes filled the disk first."""
    for output in manifest.outputs:
        if output.name.endswith(".d") and output.size > MAX_DEPINFO_SIZE:
            raise RemoteError("corrupt", f"a dep-info of {output.size} bytes")
    try:
        stats = os.statvfs(out_dir)
    except OSError:
        return
    room = stats.f_bavail * stats.f_frsize - RESTORE_MARGIN
    needed = sum(output.size for output in manifest.outputs)
    if needed > room:
        raise RemoteError("no-room", f"{needed} bytes of outputs, {max(room, 0)} free to spare")


def _now_ms(start: float) -> int:
    return int((time.monotonic() - start) * 1000)


def passthrough(rustc: str, args: Sequence[str]) -> int:
    """Become rustc (no capture, no network)."""
    try:
        os.execvp(rustc, [rustc, *args])
    except OSError as exc:
        print(f"larder-rustc: cannot run {rustc}: {exc}", file=sys.stderr)
        return 127
    return 0  # not reached


def _pump(source: BinaryIO, sink: BinaryIO, keep: list[bytes], shown: Callable[[str], str]) -> None:
    """Copy ``source`` to ``sink`` a line at a time, as ``shown`` rewrites each, keeping
    what came unchanged (a line is rewritten whole: a path never straddles two reads)."""
    pending: list[bytes] = []  # the line begun, in pieces (a long one costs no copies)
    while chunk := os.read(source.fileno(), 65536):
        keep.append(chunk)
        end = chunk.rfind(b"\n") + 1
        if not end:
            pending.append(chunk)
            continue
        sink.write(_shown_bytes(b"".join([*pending, chunk[:end]]), shown))
        sink.flush()
        pending = [chunk[end:]] if end < len(chunk) else []
    if pending:
        sink.write(_shown_bytes(b"".join(pending), shown))
        sink.flush()


def _shown_bytes(data: bytes, shown: Callable[[str], str]) -> bytes:
    """``data`` as ``shown`` rewrites its text; bytes that are not UTF-8 pass unchanged."""
    if b"/larder/" not in data:
        return data
    return shown(data.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")


def run_teed(
    command: list[str], cwd: Path, shown: Callable[[str], str]
) -> tuple[int, bytes, bytes]:
    """Run ``command``, passing its output through as it comes (each line as ``shown``
    rewrites it) and keeping a copy of what it printed."""
    import subprocess  # not needed on a hit
    import threading

    # close_fds=False: rustc must inherit cargo's jobserver pipes (CARGO_MAKEFLAGS).
    proc = subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, close_fds=False
    )
    assert proc.stdout is not None and proc.stderr is not None
    out: list[bytes] = []
    err: list[bytes] = []
    pumps = [
        threading.Thread(
            target=_pump, args=(proc.stdout, sys.stdout.buffer, out, shown), daemon=True
        ),
        threading.Thread(
            target=_pump, args=(proc.stderr, sys.stderr.buffer, err, shown), daemon=True
        ),
    ]
    for pump in pumps:
        pump.start()
    code = proc.wait()
    for pump in pumps:
        pump.join()
    return code, b"".join(out), b"".join(err)


def wraps_rustc(first: str) -> bool:
    """Whether a call's first argument is the compiler itself: cargo runs ``RUSTC_WRAPPER
    RUSTC_WORKSPACE_WRAPPER RUSTC ARGS`` (``clippy-driver``), which takes ``RUSTC`` first."""
    return not first.startswith("-") and os.path.basename(first) == "rustc"


def changed_since(
    paths: Sequence[str], cwd: Path, since_ns: int, by_device: Mapping[int, int] | None = None
) -> bool:
    """Whether any of ``paths`` (missing included) was written or replaced at ``since_ns`` or
    later (``by_device[st_dev]`` for a file on a device whose clock was read), by its change
    time: the kernel sets it from its own clock on every write, rename or link (``touch -d`` or
    ``tar`` can set a modification time in the future, not this), from a clock that lags the
    one read for ``since_ns`` by at most a tick, so a file written before ``since_ns`` never
    counts."""
    for path in paths:
        try:
            stat = os.stat(cwd / path)
        except OSError:
            return True
        since = by_device.get(stat.st_dev, since_ns) if by_device else since_ns
        if stat.st_ctime_ns >= since:
            return True
    return False


#: Nanoseconds the wall clock may drift from the monotonic one over a compilation before it
#: counts as stepped (NTP's corrections, a resume from sleep).
CLOCK_STEP_NS = 500_000_000


def stamped_now_ns(directory: Path | None) -> tuple[int, int] | None:
    """``(device, change time)`` the file system of ``directory`` gives a file written now: its
    clock (a network file system's server's) may not be this process's."""
    if directory is None:
        return None
    stamp = directory / f".larder-clock-{os.getpid()}"
    try:
        fd = os.open(stamp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"x")
            stat = os.fstat(fd)
            return stat.st_dev, stat.st_ctime_ns
        finally:
            os.close(fd)
            os.unlink(stamp)
    except OSError:
        return None


class Phase:
    """Adds the wall time of a ``with`` block to ``phases[name]`` (ms, for the log)."""

    def __init__(self, phases: dict[str, float], name: str) -> None:
        self._phases, self._name, self._start = phases, name, 0.0

    def __enter__(self) -> None:
        self._start = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        ms = (time.monotonic() - self._start) * 1000
        self._phases[self._name] = self._phases.get(self._name, 0.0) + ms


class OwnKey(NamedTuple):
    """A compilation's key as computed from its own dep-info (and link line)."""

    key: str
    inputs: cache_key.KeyInputs
    deps: depinfo.DepInfo
    tokens: list[str] | None


class Outcome:
    """What one invocation did, for the stats and the log."""

    def __init__(self, result: str, reason: str | None = None) -> None:
        self.result = result  # hit | miss | non-cacheable | error
        self.reason = reason
        self.error: str | None = None
        self.detail: str | None = None  # what the error said
        self.miss: str | None = None  # the category a miss was explained by
        self.key = ""
        self.counters: dict[str, int] = {}


class Invocation:
    """One cacheable-or-not rustc compilation."""

    def __init__(self, rustc: str, args: list[str], environ: dict[str, str]) -> None:
        self.rustc = rustc
        self.args = args
        self.env = environ
        self.compilation = rustc_args.parse(args)
        self.cwd = Path.cwd()
        out_dir = self.compilation.out_dir
        self.out_dir = self.cwd / out_dir if out_dir is not None else None
        targets = self.compilation.values("--target")
        self.target = targets[-1] if targets else None
        target_dir = (
            find_target_dir(self.out_dir, self.target) if self.out_dir is not None else None
        )
        cwd_root = logical_cwd(self.cwd, environ)
        self.roots = Roots.of(
            CWD=cwd_root,
            TARGET=target_dir,
            CARGO_HOME=default_cargo_home(environ),
            WORKSPACE=workspace_dir(target_dir, cwd_root),
        )._replace(
            cwd_remap=crate_dir_remap(
                self.compilation.input, cwd_root, bool(self.compilation.values("--cap-lints"))
            )
        )
        self.state = stats_mod.state_dir(environ)
        digests.attach(self.state)
        self.token = environ.get("LARDER_TOKEN") or None
        # Uploads only with a token that may write here (the server judges any it cannot read).
        self.writes = self.token is not None and token_claims.may_write(
            self.token, url_cache_name(environ.get("LARDER_URL", ""))
        )
        self.started = time.monotonic()
        self.toolchain: toolchain.Fingerprint | None = None
        self.link_file: Path | None = None  # where rustc writes the link line (uploads only)
        self.uploaded = ""  # the key an upload went under
        self.unkeyed = False  # a miss found without a dep-info run: no key computed yet
        # When rustc was started, once it was: by this process's clock, by the clock of the
        # output directory's file system (the change time it gave a file then) for the files
        # on that device, and on the monotonic clock, to see the wall clock step meanwhile.
        self.compile_started_ns = 0
        self.compile_wall_ns = self.compile_monotonic_ns = 0
        self.started_by_device: dict[int, int] = {}
        self.current: cache_key.KeyInputs | None = None  # the last key computed
        self.phases: dict[str, float] = {}  # where the time went, by phase (ms, for the log)
        # Given the exit code once nothing left to do can change it (a successful compilation's
        # key, explanation and upload job): the caller may go on while this call finishes.
        self.release: Callable[[int], None] | None = None
        # What rustc wrote, as it was before the caller could go on (:meth:`record_outputs`):
        # its dep-info text, and each other output's identity
        # (:func:`larder.client.uploads.identity`).
        self.depinfo_text: str | None = None
        self.produced: dict[str, tuple[int, int, int, int] | None] = {}

    # -- the pieces ------------------------------------------------------------------------

    def command(self) -> list[str]:
        extra = [f"--print=link-args={self.link_file}"] if self.link_file else []
        head, args = [self.rustc], self.args
        if args and wraps_rustc(args[0]):  # clippy-driver RUSTC ARGS: the driver reads RUSTC
            head, args = [self.rustc, args[0]], args[1:]
        # The remaps first: rustc lets the last matching one win, so the user's own win.
        return [*head, *self.roots.remap_flags(), *args, *extra]

    def compile(self, outcome: Outcome) -> tuple[int, bytes, bytes]:
        start = time.monotonic()
        self.compile_wall_ns, self.compile_monotonic_ns = time.time_ns(), time.monotonic_ns()
        self.compile_started_ns = self.compile_wall_ns
        stamped = stamped_now_ns(self.out_dir)  # files there are dated by that clock
        self.started_by_device = dict([stamped]) if stamped is not None else {}
        with Phase(self.phases, "rustc"):
            code, out, err = run_teed(self.command(), self.cwd, self.roots.shown)
        outcome.counters["compile_ms"] = _now_ms(start)
        return code, out, err

    def _offline_file(self) -> Path:
        return self.state / "offline-until"

    def offline(self) -> bool:
        """Whether this cache (``LARDER_URL``: builds for other caches share the state
        directory) was found unreachable less than :data:`OFFLINE_SECONDS` ago."""
        try:
            until, _, url = self._offline_file().read_text().partition(" ")
            return url == self.env.get("LARDER_URL", "") and time.time() < float(until)
        except (OSError, ValueError):
            return False

    def go_offline(self) -> None:
        try:
            self.state.mkdir(parents=True, exist_ok=True)
            marker = f"{time.time() + OFFLINE_SECONDS} {self.env.get('LARDER_URL', '')}"
            self._offline_file().write_text(marker)
        except OSError:
            pass

    def base(self) -> cache_key.Base:
        """Key items that need no dep-info run (the toolchain is cached per rustc binary)."""
        self.toolchain = toolchain.fingerprint(self.rustc, self.target, self.env, self.state)
        version = self.toolchain.version
        if self.compilation.codegen().get("target-cpu") == "native":
            version += toolchain.native_cpu(self.rustc, self.target, self.env, self.state)
        return cache_key.base_inputs(
            rustc_version=version,
            sysroot=self.toolchain.libraries,
            compilation=self.compilation,
            roots=self.roots,
            cwd=self.cwd,
            environ=self.env,
        )

    def link_roots(self) -> Roots:
        assert self.toolchain is not None
        return self.roots.extended(SYSROOT=Path(self.toolchain.sysroot))

    def link_item(self, tokens: list[str], recorded: bool = False) -> dict[str, object]:
        """Key item 11 for a link line (:class:`linkline.Unaccounted` if it has no account).

        A ``recorded`` line (a direct entry's, from the cache) must name the linker this
        compilation would run (``-C linker=``, else ``cc``): the key asks that program for its
        version and search directories, and the cache must not choose what runs here.
        """
        from larder.client import linker  # linked crates only

        assert self.toolchain is not None
        plan = linkline.classify(tokens)
        if recorded:
            chosen = self.compilation.codegen().get("linker") or "cc"
            if plan.program not in (chosen, self.link_roots().portable(chosen)):
                raise linkline.Unaccounted("linker", f"the entry's linker is not {chosen}")
            self.check_recorded_places(plan)
        target = self.target or self.toolchain.host
        tools = toolchain.tools(self.rustc, self.toolchain, self.target, self.env, self.state)
        covered = {f"lib/rustlib/{target}/lib/{n}": h for n, h in self.toolchain.libraries}
        covered.update(tools)
        link = linker.Link(
            roots=self.link_roots(),
            cwd=self.cwd,
            environ=self.env,
            state_dir=self.state,
            fingerprint=self.toolchain,
            covered=covered,
        )
        return {**link.item(tokens, plan), "sysroot_tools": tools}

    def check_recorded_places(self, plan: linkline.Plan) -> None:
        """A recorded line names files only where a direct entry may (the project, the
        sysroot, what this compilation's own arguments name) and libraries by name only."""
        assert self.toolchain is not None
        if any("/" in lib.name for lib in plan.libs):
            raise cache_key.KeyUnavailable("the entry's link line names a library by path")
        roots = self.link_roots()
        own = linkline.classify(["cc", *linkline.link_args(self.compilation)])
        named = [*own.files, *own.scripts, *own.search]
        named += [str(path) for _, path in cache_key.search_dirs(self.compilation, self.cwd)]
        paths = [*plan.files, *plan.search, *(name for name in plan.scripts if "/" in name)]
        paths += [flag[2:] for flag in plan.driver if flag.startswith("-B")]  # searched too
        cache_key.check_link_places(
            (roots.local(path) for path in paths if not path.startswith(linkline.RUSTC_TMP)),
            self.roots,
            self.cwd,
            self.toolchain.sysroot,
            named,
        )

    def link_tokens(self) -> list[str]:
        """The link line rustc just wrote, in portable form."""
        assert self.link_file is not None and self.out_dir is not None
        argv = linkline.parse(self.link_file.read_text())
        out_dirs = [str(self.out_dir), str(self.compilation.out_dir)]
        tmp = linkline.rustc_tmp(argv, [*out_dirs, self.env.get("TMPDIR") or "/tmp"])
        roots = self.link_roots().extended(RUSTC_TMP=Path(tmp) if tmp else None)
        stem = self.compilation.stem
        return linkline.normalise(argv, out_dirs=out_dirs, stem=stem, portable=roots.portable)

    def keep(self, inputs: cache_key.KeyInputs) -> str:
        """The key of ``inputs``; with ``LARDER_KEY_DIR`` also write them down."""
        key = inputs.key()
        self.current = inputs
        if self.env.get("LARDER_KEY_DIR"):
            directory = Path(self.env["LARDER_KEY_DIR"])
            directory.mkdir(parents=True, exist_ok=True)
            (directory / f"{key}.json").write_bytes(inputs.document())
        return key

    def full_inputs(self, base: cache_key.Base, deps: depinfo.DepInfo) -> cache_key.KeyInputs:
        files, env = list(deps.files), [name for name, _ in deps.env]
        return cache_key.complete(base, files, env, self.roots, self.cwd, self.env)

    def restore(self, remote: Remote, manifest: Manifest) -> None:
        """Download every output beside its final name, then move them all into place.

        Lookups and restore share :data:`LOOKUP_TIMEOUTS` x ``LARDER_TIMEOUT`` for starting
        requests (the restore gets what the lookups left, at least one ``LARDER_TIMEOUT``):
        an output whose download would start later is not asked for, and the compilation runs
        here (error kind ``slow``; a server answering each request just within the timeout made
        a hit cost many times a compilation). A download under way is never cut off for the
        deadline: each answer has its own timeout and least rate (:mod:`.transport`), and
        downloads of parallel hits share the link."""
        assert self.out_dir is not None
        expected = self.compilation.expected_outputs()
        executables = self.compilation.executables()
        if sorted(o.name for o in manifest.outputs) != expected:
            raise RemoteError("corrupt", f"manifest outputs are not this compilation's {expected}")
        check_room(self.out_dir, manifest)
        looked = self.phases.get("lookup", 0.0) / 1000
        left = max(LOOKUP_TIMEOUTS * self.timeout() - looked, self.timeout())
        deadline = time.monotonic() + left
        staged: list[tuple[Path, Path]] = []
        try:
            for output in manifest.outputs:
                if time.monotonic() > deadline:
                    raise RemoteError("slow", f"restoring past {LOOKUP_TIMEOUTS}x LARDER_TIMEOUT")
                final = self.out_dir / output.name
                scratch = self.out_dir / f".{output.name}.larder-{os.getpid()}"
                staged.append((scratch, final))
                with open(scratch, "wb") as handle:
                    remote.download_blob(output.blake3, handle, output.size)
                if output.name.endswith(".d"):
                    text = self.roots.local(scratch.read_text())
                    self.check_depinfo(text)
                    scratch.write_text(text)
                os.chmod(scratch, file_mode(output.name in executables))
            for scratch, final in staged:
                os.replace(scratch, final)
        finally:
            for scratch, _ in staged:
                scratch.unlink(missing_ok=True)

    def check_depinfo(self, text: str) -> None:
        """A restored dep-info must name the files and variables the key read: cargo decides
        from it what to compile again, and one naming fewer left edits unseen for good."""
        assert self.current is not None
        deps = depinfo.parse(text)
        read = {os.path.normpath(self.roots.local(path)) for path, _ in self.current.sources}
        if {os.path.normpath(path) for path in deps.files} != read:
            raise RemoteError("corrupt", "the dep-info names other files than the key read")
        if {name for name, _ in deps.env} != {name for name, _ in self.current.env_deps}:
            raise RemoteError("corrupt", "the dep-info names other variables than the key read")

    def replay(self, printed: tuple[str, str]) -> None:
        for text, stream in zip(printed, (sys.stdout, sys.stderr), strict=True):
            if text:
                shown = self.roots.shown(self.roots.local(text))
                stream.buffer.write(shown.encode("utf-8", "replace"))
                stream.flush()

    def record_outputs(self) -> None:
        """Read the dep-info rustc wrote and note each other output's identity, before the
        caller (cargo) may go on: the next compilation of the same crate writes the same file
        names, and what is hashed and uploaded afterwards must be what this one produced."""
        from larder.client.uploads import identity

        assert self.out_dir is not None
        for name in self.compilation.expected_outputs():
            path = self.out_dir / name
            if name.endswith(".d"):
                try:
                    self.depinfo_text = path.read_text()
                except (OSError, UnicodeDecodeError):
                    self.depinfo_text = None
            else:
                self.produced[name] = identity(path)

    def clock_stepped(self) -> bool:
        """Whether the wall clock stepped, either way, since rustc was started."""
        wall = time.time_ns() - self.compile_wall_ns
        monotonic = time.monotonic_ns() - self.compile_monotonic_ns
        return abs(wall - monotonic) > CLOCK_STEP_NS

    def own_inputs(self, base: cache_key.Base) -> OwnKey | str:
        """The key from the dep-info file rustc just wrote with the outputs (the same command's
        own account of what it read, as a hit computes it from the direct entry recorded from
        it), and for a linked crate the link line it printed; an error kind when there is none.
        """
        if self.depinfo_text is None:
            return "no-dep-info"
        deps = depinfo.parse(self.depinfo_text)
        saved = changed_since(deps.files, self.cwd, self.compile_started_ns, self.started_by_device)
        if self.clock_stepped() or saved:
            # Saved while rustc ran (or the clock stepped, and change times cannot tell): the
            # key would name the new text, the outputs the old.
            return "changed-while-compiling"
        tokens: list[str] | None = None
        link: dict[str, object] | None = None
        if self.compilation.linked:
            if self.link_file is None:
                return "no-link-line"  # only asked for when uploading
            try:
                with Phase(self.phases, "key_link"):
                    tokens = self.link_tokens()
                    link = self.link_item(tokens)
            except linkline.Unaccounted as exc:
                return exc.kind
            except cache_key.KeyUnavailable:
                return "link-input"
        files, env = list(deps.files), [name for name, _ in deps.env]
        inputs = cache_key.complete(base, files, env, self.roots, self.cwd, self.env, link)
        return OwnKey(self.keep(inputs), inputs, deps, tokens)

    def queue_upload(self, own: OwnKey, direct: str, out: bytes, err: bytes) -> str | None:
        """Hash and snapshot this compilation's outputs into an upload job for the uploader
        (:mod:`larder.client.uploads`); an error kind when they may not be shared."""
        from larder.client import uploads

        assert self.out_dir is not None
        spellings = self.link_roots().spellings
        if not self.roots.cwd_remap:  # its outputs name its directory, which the key holds
            spellings = tuple((name, path) for name, path in spellings if name != "CWD")
        needles = scan_needles(spellings, self.args)
        outputs: list[Output] = []
        files: dict[str, Path] = {}
        texts: dict[str, bytes] = {}
        expected: dict[str, tuple[int, int, int, int]] = {}
        for name in self.compilation.expected_outputs():
            path = self.out_dir / name
            try:
                found = path.stat()
            except OSError:
                return "outputs-missing"
            if not S_ISREG(found.st_mode):
                return "outputs-missing"
            if name.endswith(".d"):
                if self.depinfo_text is None:
                    return "outputs-missing"
                text = self.roots.portable(self.depinfo_text).encode()
                blob_id, size = blake3.blake3(text).hexdigest(), len(text)
                texts[blob_id] = text
            else:
                with Phase(self.phases, "scan"):
                    if embeds(path, needles):
                        return "embeds-paths"
                produced = self.produced.get(name)
                if produced is None:
                    return "outputs-missing"
                with Phase(self.phases, "hash"):
                    blob_id, size = digests.file_digest(path), found.st_size
                files[blob_id] = path
                expected[blob_id] = produced  # checked when the job is made: size included
            outputs.append(Output(name, blob_id, size, found.st_mode & 0o777))
        stdout, stderr = (self.roots.portable(b.decode("utf-8", "replace")) for b in (out, err))
        crate = self.compilation.crate_name or "unknown"
        document = Manifest.made(crate, tuple(outputs), stdout, stderr).to_json()
        if len(document) > MAX_MANIFEST_SIZE:
            return "too-large"  # what rustc printed: nothing is sent the server would refuse
        entry = cache_key.direct_entry(own.deps, self.roots, own.tokens)
        inputs = self.inputs_document(own.inputs)
        job = {
            "url": self.env["LARDER_URL"],
            "key": own.key,
            "crate": crate,
            "blobs": sorted({*files, *texts}),
            "manifest": document.decode(),
            "direct_key": direct,
            "direct_entry": entry.to_json().decode(),
            "inputs": inputs.decode() if inputs is not None else None,
            "token": self.token,
        }
        with Phase(self.phases, "snapshot"):
            spool = uploads.spool_dir(self.state, self.env["LARDER_URL"])
            try:
                uploads.enqueue(spool, job, files, texts, expected)
            except uploads.OutputChanged:
                return "changed-after-compiling"  # the next build of the crate wrote it
            uploads.start_uploader(spool, self.env)
        self.uploaded = own.key
        return None

    # -- explaining misses -----------------------------------------------------------------

    def identity(self) -> Identity | None:
        """The crate as the cache indexes inputs documents (None outside cargo)."""
        from larder.protocol.inputs import check_identity

        assert self.toolchain is not None
        fields = {
            "package": self.env.get("CARGO_PKG_NAME"),
            "crate": self.compilation.crate_name,
            "version": self.env.get("CARGO_PKG_VERSION"),
            "crate_type": ",".join(sorted(set(self.compilation.crate_types))),
            "target": self.target or self.toolchain.host,
        }
        try:
            return check_identity(fields)
        except FormatError:
            return None

    def inputs_document(self, inputs: cache_key.KeyInputs) -> bytes | None:
        """The key's inputs document to store beside its manifest, ``env!`` values hashed
        unless safe; None outside cargo or over the size limit (the upload stands without)."""
        from larder.client.explain import safe_env
        from larder.protocol.inputs import MAX_INPUTS_SIZE, InputsDocument, redact

        identity = self.identity()
        if identity is None:
            return None
        fields = redact(json.loads(inputs.document()), safe_env(self.env))
        document = InputsDocument(identity, fields).to_json()
        return document if len(document) <= MAX_INPUTS_SIZE else None

    def current_inputs(self, base: cache_key.Base) -> dict[str, object] | None:
        """This compilation's inputs as far as known: the last key computed, else (a linked
        crate no direct entry gave a key) items 2-4 and 7-10 and the crate root."""
        known: dict[str, object]
        if self.current is not None:
            known = json.loads(self.current.document())
        elif self.compilation.linked:
            partial = cache_key.partial(base, self.compilation, self.roots, self.cwd)
            known = json.loads(json.dumps(partial))
        else:
            return None
        return known

    def explain(self, remote: Remote, base: cache_key.Base, outcome: Outcome) -> None:
        """Why this compilation missed, recorded for ``explain`` and reported to the cache.
        Never fails: anything going wrong makes the miss ``unknown``."""
        from larder.client import explain as why
        from larder.protocol.inputs import Explanation, redact

        explanation: Explanation | None = None
        try:
            identity = self.identity()
            current = self.current_inputs(base)
            if identity is not None and current is not None:
                current = redact(current, why.safe_env(self.env))
                explanation = why.explain_miss(remote, identity, current)
        except Exception:  # an explanation is never worth a failed build
            explanation = None
        crate = self.compilation.crate_name or "unknown"
        if explanation is not None:
            try:
                remote.report_explained(crate, explanation.category)
            except (*REMOTE_ERRORS, *KEY_ERRORS):
                pass
        else:
            explanation = Explanation("unknown", [])
        outcome.miss = explanation.category
        externs = {}
        for value in self.compilation.values("--extern"):
            name, sep, path = value.partition("=")
            if sep:
                externs[name] = why.stem_of(path)
        try:
            why.record(
                self.state,
                crate=crate,
                package=self.env.get("CARGO_PKG_NAME") or "-",
                stem=self.compilation.stem,
                explanation=explanation,
                externs=externs,
            )
        except OSError:
            return

    # -- the whole thing -------------------------------------------------------------------

    def run(self) -> tuple[int, Outcome]:
        if not self.compilation.cacheable:
            return self.uncached(self.compilation.reason or "unknown")
        if self.compilation.linked:
            reason = linkline.check_compilation(self.compilation, self.cwd)
            if reason:
                return self.uncached(reason)
        try:
            with Phase(self.phases, "key"):
                base = self.base()
                direct = cache_key.direct_key(base, self.compilation, self.roots, self.cwd)
        except KEY_ERRORS:
            return self.uncached("no-key")
        assert self.toolchain is not None and self.out_dir is not None
        if self.compilation.linked and self.toolchain.release < linkline.MIN_RELEASE:
            return self.uncached("rustc-version")
        try:
            return self.cached(base, direct)
        finally:
            if self.link_file is not None:
                self.link_file.unlink(missing_ok=True)

    def cached(self, base: cache_key.Base, direct: str) -> tuple[int, Outcome]:
        """Look up, or compile and (with a token) upload, a cacheable compilation."""
        outcome = Outcome("miss")
        if self.offline():
            outcome.result, outcome.error = "error", "offline"
            outcome.counters["errors"] = 1
            code, _, _ = self.compile(outcome)
            return code, outcome
        remote: Remote | None = None
        try:
            remote = Remote(self.env["LARDER_URL"], self.token, self.timeout(), self.env)
            if self.lookup(remote, base, direct, outcome):
                return 0, outcome
        except KEY_ERRORS:
            # Usually a compile error the dep-info run met first: rustc will report it.
            if remote is not None:
                remote.close()
            return self.uncached("no-key")
        except REMOTE_ERRORS as exc:
            outcome.result = "error"
            self._failed(outcome, exc)
            if getattr(exc, "kind", None) != "gone":
                remote = None
        if self.compilation.linked and self.writes and remote is not None:
            assert self.out_dir is not None
            self.link_file = self.out_dir / f".larder-link-{os.getpid()}-{os.urandom(4).hex()}"
        code, out, err = self.compile(outcome)
        if code != 0 and self.unkeyed:
            # No dep-info run met the error first: a failed compilation is still not cacheable.
            if remote is not None:
                remote.close()
            failed = Outcome("non-cacheable", reason="no-key")
            failed.counters = {"non_cacheable": 1, "compile_ms": outcome.counters["compile_ms"]}
            return code, failed
        if code == 0:
            self.record_outputs()
            if self.release is not None:
                self.release(code)
        own: OwnKey | str | None = None
        if code == 0 and remote is not None:
            try:
                with Phase(self.phases, "key"):
                    own = self.own_inputs(base)
            except KEY_ERRORS as exc:
                self._failed(outcome, exc)
        if self.unkeyed and isinstance(own, OwnKey) and remote is not None:
            if remote.miss_counted:  # the server counted the direct lookup's 404
                outcome.key = own.key
            else:
                # The lookup the dep-info run would have made: the cache counts the crate's
                # miss (for its most-missed crates and hit rates). Nothing is stored under it.
                try:
                    with Phase(self.phases, "lookup"):
                        remote.get_manifest(own.key, self.compilation.crate_name)
                    outcome.key = own.key
                except REMOTE_ERRORS:
                    pass  # the miss stands; the upload will meet the same server
        if outcome.counters.get("misses") and remote is not None:
            with Phase(self.phases, "explain"):
                self.explain(remote, base, outcome)
        if remote is not None:
            outcome.counters["bytes_down"] = remote.bytes_down
            remote.close()
        if self.writes and remote is not None and own is not None:
            try:
                refused = own if isinstance(own, str) else self.queue_upload(own, direct, out, err)
                if refused:
                    outcome.error = refused
                    outcome.counters["errors"] = outcome.counters.get("errors", 0) + 1
                else:
                    outcome.key = outcome.key or self.uploaded
            except (*REMOTE_ERRORS, *KEY_ERRORS) as exc:
                self._failed(outcome, exc)
        return code, outcome

    def uncached(self, reason: str) -> tuple[int, Outcome]:
        outcome = Outcome("non-cacheable", reason=reason)
        outcome.counters["non_cacheable"] = 1
        code, _, _ = self.compile(outcome)
        return code, outcome

    def timeout(self) -> float:
        return network_timeout(self.env)

    def lookup(self, remote: Remote, base: cache_key.Base, direct: str, outcome: Outcome) -> bool:
        """Find and restore a cached compilation; whether it was a hit.

        Direct entries first (no rustc run); then the key from a real dep-info run.
        """
        tried: set[str] = set()
        linked = self.compilation.linked
        deadline = time.monotonic() + LOOKUP_TIMEOUTS * self.timeout()
        with Phase(self.phases, "lookup"):
            entries = remote.get_direct(direct, self.compilation.crate_name)
        for entry in entries:
            if time.monotonic() > deadline:  # each answer in time, all of them far too slow
                raise RemoteError("timeout", f"lookups past {LOOKUP_TIMEOUTS}x LARDER_TIMEOUT")
            try:
                link = self.link_item(entry.link, recorded=True) if linked else None
                inputs = cache_key.from_direct_entry(
                    base, entry, self.roots, self.cwd, self.env, link
                )
            except (cache_key.KeyUnavailable, linkline.Unaccounted):
                continue  # names a file this checkout does not have, or no usable link line
            key = self.keep(inputs)
            tried.add(key)
            if self.fetch(remote, key, outcome):
                return True
        if linked:  # item 11 comes only from a link: no entry, no key
            outcome.counters["misses"] = 1
            return False
        if not entries:
            # Every upload records a direct entry beside its manifest, under this direct key:
            # with none there is no key to find. The compilation's own dep-info gives the key.
            self.unkeyed = True
            outcome.counters["misses"] = 1
            return False
        assert self.out_dir is not None
        with Phase(self.phases, "depinfo_rustc"):
            deps = cache_key.depinfo_run(
                self.rustc, self.compilation, self.cwd, self.out_dir, self.env
            )
        with Phase(self.phases, "key"):
            key = self.keep(self.full_inputs(base, deps))
        outcome.key = key
        if key not in tried and self.fetch(remote, key, outcome):
            return True
        outcome.counters["misses"] = 1
        return False

    def fetch(self, remote: Remote, key: str, outcome: Outcome) -> bool:
        """Restore the compilation stored under ``key``, if there is one."""
        with Phase(self.phases, "lookup"):
            document = remote.get_manifest(key, self.compilation.crate_name)
        if document is None:
            return False
        try:
            manifest = parse_manifest(document)
            printed = manifest.printed()
        except FormatError as exc:  # the cache's answer, not this compilation, is wrong
            raise RemoteError("corrupt", exc.message) from None
        with Phase(self.phases, "restore"):
            self.restore(remote, manifest)
        self.replay(printed)
        outcome.result, outcome.key = "hit", key
        outcome.counters.update(hits=1, bytes_down=remote.bytes_down)
        remote.close()
        return True

    def _failed(self, outcome: Outcome, exc: Exception) -> None:
        outcome.detail = str(exc)
        if isinstance(exc, RemoteError):
            outcome.error = exc.kind
        elif isinstance(exc, ValueError):  # FormatError too: a manifest that makes no sense
            outcome.error = "corrupt"
        else:
            outcome.error = "io"
        outcome.counters["errors"] = outcome.counters.get("errors", 0) + 1
        if isinstance(exc, RemoteError) and exc.unreachable:
            self.go_offline()


def _log(
    environ: dict[str, str], crate: str, outcome: Outcome, ms: int, phases: dict[str, float]
) -> None:
    path = environ.get("LARDER_LOG")
    if not path:
        return
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    line = (
        f"{stamp} crate={crate} key={outcome.key[:16] or '-'} result={outcome.result} "
        f"reason={outcome.reason or outcome.error or outcome.miss or '-'} ms={ms} "
        f"pkg={environ.get('CARGO_PKG_NAME') or '-'} "
        f"phases={','.join(f'{k}:{v:.0f}' for k, v in sorted(phases.items())) or '-'}\n"
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError:
        pass


def _stats_command(argv: list[str], environ: dict[str, str]) -> int:
    store = stats_mod.Stats(stats_mod.state_dir(environ))
    try:
        if argv[0] == "--zero-stats":
            store.zero()
            print("larder-rustc: statistics reset")
            return 0
        current = store.read()
        as_json = "--json" in argv
        print(json.dumps(current, sort_keys=True) if as_json else stats_mod.render(current))
        sys.stdout.flush()
    except BrokenPipeError:  # `--stats | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        print(f"larder-rustc: statistics in {stats_mod.state_dir(environ)}: {exc}", file=sys.stderr)
        return 1
    return 0


def _wait_command(argv: list[str], environ: dict[str, str]) -> int:
    """``--wait-uploads [SECONDS]``: until this cache's upload jobs (every cache's without
    ``LARDER_URL``) are sent; 1 if some are still waiting after SECONDS (default 300)."""
    from larder.client import uploads

    try:
        seconds = float(argv[1]) if len(argv) > 1 else 300.0
    except ValueError:
        print(f"larder-rustc: --wait-uploads takes seconds, not {argv[1]!r}", file=sys.stderr)
        return 2
    state = stats_mod.state_dir(environ)
    if environ.get("LARDER_URL"):
        spools = [uploads.spool_dir(state, environ["LARDER_URL"])]
    else:
        spools = sorted((state / "uploads").glob("*")) if (state / "uploads").is_dir() else []
    deadline = time.monotonic() + seconds
    for spool in spools:
        if not uploads.wait(spool, environ, max(deadline - time.monotonic(), 0.0)):
            left = len(uploads.pending(spool))
            print(f"larder-rustc: {left} upload(s) still waiting in {spool}", file=sys.stderr)
            return 1
    return 0


def _nothing() -> None:
    pass


def compile_call(
    argv: list[str],
    environ: dict[str, str],
    startup: float,
    taken: Callable[[], None] = _nothing,
    release: Callable[[int], None] | None = None,
) -> int | None:
    """One call ``RUSTC ARGS...`` with the cache enabled: its exit code, or None, before
    anything was done, when it is not a compilation (the caller then becomes rustc).
    ``startup``: the milliseconds the calling process took to get here (for ``LARDER_LOG``);
    ``taken`` runs once the call is known to be a compilation, before anything is done;
    ``release``, if given, gets the exit code of a compilation that uploads (a write token)
    as soon as the rest cannot change it (the compilation succeeded): the caller may exit while
    the key, the explanation and the upload job are made. Until this returns, the upload spool
    holds a mark, so ``--wait-uploads`` waits for that job, its stats and its log line."""
    invocation = Invocation(argv[0], argv[1:], environ)
    if not invocation.compilation.is_compilation:
        return None
    taken()
    invocation.phases["startup"] = startup
    mark: tuple[Path, int] | None = None
    if release is not None and invocation.writes:

        def early(code: int) -> None:
            nonlocal mark
            from larder.client import explain, uploads

            mark = uploads.hold(uploads.spool_dir(invocation.state, environ["LARDER_URL"]))
            explain.build_id()  # while cargo, whose process names the build, still runs
            release(code)

        invocation.release = early
    try:
        return _finish(invocation, environ)
    finally:
        if mark is not None:
            from larder.client import uploads

            uploads.drop(mark)


def _finish(invocation: Invocation, environ: dict[str, str]) -> int:
    """Run the compilation, count it in the stats and log it; its exit code."""
    code, outcome = invocation.run()
    ms = _now_ms(invocation.started)
    counters = dict(outcome.counters)
    counters["cache_ms"] = max(ms - counters.get("compile_ms", 0), 0)
    try:  # noqa: SIM105 - contextlib.suppress would cost an import on every invocation
        stats_mod.Stats(invocation.state).add(
            counters,
            reason=outcome.reason if outcome.result == "non-cacheable" else None,
            error=outcome.error,
            miss=outcome.miss,
            detail=outcome.detail,
        )
    except OSError:
        pass
    _log(environ, invocation.compilation.crate_name or "-", outcome, ms, invocation.phases)
    return code


#: What ``larder-rustc --help`` prints (docs/rustc-cache.md has every setting).
USAGE = """\
usage: RUSTC_WRAPPER=larder-rustc cargo build   (cargo runs: larder-rustc RUSTC ARGS...)
       larder-rustc --stats [--json]      hits, misses by category, errors, bytes, time
       larder-rustc --zero-stats          start the counts again
       larder-rustc explain [CRATE] [--json]
                                          why the last build's crates missed
       larder-rustc --wait-uploads [SECONDS]
                                          until this machine's uploads are sent (CI's last step)

environment:
  LARDER_URL      the cache, e.g. http://larder:8080/main (unset: rustc runs untouched)
  LARDER_TOKEN    a token: a write token also uploads, a read token reads a private cache
  LARDER_DISABLE  1: rustc runs untouched
  LARDER_LOG      a file that gets one line per compilation
  LARDER_TIMEOUT  seconds per network operation (default 5)
  LARDER_STATE_DIR  statistics and the toolchain cache (default $XDG_CACHE_HOME/larder)
"""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    environ = dict(os.environ)
    if argv and argv[0] in ("--stats", "--zero-stats", "explain"):
        from larder.client import uploads

        # Compilations whose exit code went back early may still be counting and explaining.
        uploads.settle(stats_mod.state_dir(environ))
    if argv and argv[0] in ("--stats", "--zero-stats"):
        return _stats_command(argv, environ)
    if argv and argv[0] == "--wait-uploads":
        return _wait_command(argv, environ)
    if argv and argv[0] == "explain":
        from larder.client.explain import command

        return command(argv, stats_mod.state_dir(environ))
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if cache_enabled(environ):
        startup = startup_ms() if environ.get("LARDER_LOG") else 0.0
        code = compile_call(argv, environ, startup)
        if code is not None:
            return code
    return passthrough(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
