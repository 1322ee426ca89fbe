"""Uploads off the build's critical path: a spool of upload jobs and a detached uploader.

A compilation that missed ends, for the shim, once its outputs are *snapshot* into a job: each
output file is hard-linked (copied where a link is impossible) into a job directory under
``<state>/uploads/<spool>/`` (one spool per cache URL), next to ``job.json``, which holds the
key, the manifest, the direct key and entry, the inputs document and the token of the build
that queued it (each job is sent with its own build's token, whichever build started the
uploader; the file is readable by its owner only). The blob ids in the
manifest were computed by the shim from the files rustc had just written, so the bytes the
uploader sends are the compilation's: a file changed in place later no longer hashes to its id
and the server refuses it (a counted error, nothing stored). A job becomes visible to the
uploader only when complete (written beside the spool and renamed into it).

The uploader (``python -m larder.client.uploads SPOOL``) is started on demand by the shim that
finds none running (it holds an exclusive ``flock`` on ``SPOOL/uploader.lock``), outlives that
rustc call in its own session with no inherited descriptors (cargo waits for no one), sends the
spool's jobs oldest first over one connection and, after ``LINGER`` seconds with nothing to do,
exits. For each job, in this order: the blobs the server lacks, then the manifest (the server
accepts it only once its blobs are held), then the direct entry, then the inputs document; then
the job is removed.
Each network operation has ``LARDER_TIMEOUT``. The uploader lowers its priority
(``LARDER_UPLOAD_NICE``, default 10), so it takes the CPU a busy build leaves over, and sends
each blob as a zstd stream (``LARDER_UPLOAD_ZSTD_LEVEL``, default 1; ``off`` sends the bytes as
they are), which the server decodes to check and keeps as sent: a fraction of the bytes on the
network and no compression on the server. An upload that fails is counted in the stats
(``errors``, by kind) and its job dropped; after an unreachable server the remaining jobs are
dropped and counted as ``offline``. An uploader killed mid-job leaves the job in the spool: the
next uploader sends it again from the start, and the order above means no manifest was ever
stored without its blobs.

``larder-rustc --wait-uploads [SECONDS]`` starts an uploader if jobs are waiting and none runs,
and returns once the spool is empty (exit 0) or after ``SECONDS`` (default 300; exit 1): the
last step of a CI job, so its uploads are done before the machine goes away.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import blake3

#: Seconds an uploader with nothing to send waits for more before it exits: longer than the
#: gaps between two misses of a build (a new uploader costs an interpreter and its imports).
LINGER = 10.0
#: Niceness the uploader adds: it takes CPU a busy build leaves over.
DEFAULT_NICE = 10
#: zstd level of uploads: fast, and within a few percent of the server's level 3 in size.
DEFAULT_LEVEL = 1
POLL = 0.05
JOB_FILE = "job.json"
LOCK_FILE = "uploader.lock"
#: Longest wait for compilations still being recorded before stats or explanations are read.
SETTLE = 60.0
_PREFIX = "job-"
_BUSY = ".busy-"


def spool_dir(state: Path, url: str) -> Path:
    """The spool of ``url``'s jobs in the state directory ``state``."""
    return state / "uploads" / blake3.blake3(url.encode()).hexdigest()[:16]


def pending(spool: Path) -> list[Path]:
    """Complete jobs waiting in ``spool``, oldest first."""
    try:
        names = sorted(n for n in os.listdir(spool) if n.startswith(_PREFIX))
    except FileNotFoundError:
        return []
    return [spool / name for name in names]


def hold(spool: Path) -> tuple[Path, int] | None:
    """Mark ``spool`` as about to get a job from this process, until :func:`drop`:
    ``--wait-uploads`` waits for the job too. None when no mark can be made.

    The mark is a ``.busy-*`` file this process holds a ``flock`` on (taken before the file
    gets its name, so a waiter never sees it unlocked while its maker lives).
    """
    token = f"{os.getpid()}-{os.urandom(4).hex()}"
    scratch = spool / f".tmp-busy-{token}"
    try:
        spool.mkdir(parents=True, exist_ok=True)
        fd = os.open(scratch, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        path = spool / f"{_BUSY}{token}"
        os.rename(scratch, path)
    except OSError:
        os.close(fd)
        with contextlib.suppress(OSError):
            scratch.unlink()
        return None
    return path, fd


def drop(mark: tuple[Path, int]) -> None:
    """Remove a mark made by :func:`hold`."""
    path, fd = mark
    with contextlib.suppress(OSError):
        path.unlink()
    os.close(fd)


def busy(spool: Path) -> bool:
    """Whether a live process holds a mark on ``spool`` (marks of dead ones are removed)."""
    try:
        names = [n for n in os.listdir(spool) if n.startswith(_BUSY)]
    except FileNotFoundError:
        return False
    for name in names:
        try:
            fd = _try_lock(spool / name, create=False)
        except OSError:
            continue  # dropped meanwhile
        if fd is None:
            return True
        os.close(fd)
        with contextlib.suppress(OSError):
            (spool / name).unlink()  # its maker died before dropping it
    return False


def settle(state: Path, seconds: float = SETTLE) -> None:
    """Wait, at most ``seconds``, until no compilation of any spool in the state directory
    ``state`` is still being recorded (:func:`hold`): before stats or explanations are read."""
    root = state / "uploads"
    try:
        spools = [root / name for name in os.listdir(root)]
    except OSError:
        return
    deadline = time.monotonic() + seconds
    while any(busy(spool) for spool in spools) and time.monotonic() < deadline:
        time.sleep(POLL)


class OutputChanged(Exception):
    """An output was replaced or written again since it was recorded."""


def identity(path: Path) -> tuple[int, int, int, int] | None:
    """What tells that a file was replaced or written: its device, inode, size and modification
    time (not its change time, which a hard link to it moves too); ``None`` if it is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _snapshot(source: Path, destination: Path, expected: tuple[int, int, int, int] | None) -> None:
    """Link (else copy) ``source`` to ``destination``; with ``expected``, the identity it had
    when recorded, :class:`OutputChanged` unless what was taken is still that file."""
    try:
        os.link(source, destination)
        taken = destination  # the same inode: what the uploader will read
    except OSError:  # another file system, or links not allowed: a copy
        import shutil  # not on the shim's path when links work (it imports bz2 and lzma)

        shutil.copyfile(source, destination)
        taken = source  # unchanged after the copy: the copy is of it
    if expected is not None and not _unchanged(identity(taken), expected):
        raise OutputChanged(str(source))


def _unchanged(now: tuple[int, int, int, int] | None, recorded: tuple[int, int, int, int]) -> bool:
    """The same file, not written since: the same device, inode and size, and a modification
    time no later than recorded. Earlier is allowed: after ``cargo check`` cargo sets each
    output's time back to when the compilation started; a write since moves it forward."""
    return now is not None and now[:3] == recorded[:3] and now[3] <= recorded[3]


def enqueue(
    spool: Path,
    job: dict[str, Any],
    files: dict[str, Path],
    texts: dict[str, bytes],
    expected: dict[str, tuple[int, int, int, int]] | None = None,
) -> Path:
    """Write a job: ``files`` (blob id -> the output rustc wrote) snapshot, ``texts`` (blob id ->
    bytes, e.g. a rewritten dep-info) stored, ``job`` as ``job.json``; return its path.

    ``expected`` (blob id -> :func:`identity`), the outputs as rustc left them: a file replaced
    or written since (the next compilation of the crate, once the caller went on) raises
    :class:`OutputChanged` and queues nothing, since its blob id was perhaps hashed from it."""
    spool.mkdir(parents=True, exist_ok=True)
    name = f"{time.time_ns():020d}-{os.getpid()}-{os.urandom(4).hex()}"
    scratch = spool / f".tmp-{name}"
    scratch.mkdir()
    try:
        for blob_id, path in files.items():
            _snapshot(path, scratch / blob_id, (expected or {}).get(blob_id))
        for blob_id, data in texts.items():
            (scratch / blob_id).write_bytes(data)
        # Owner-only: the job holds the token of the build that queued it.
        fd = os.open(scratch / JOB_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(job, sort_keys=True))
        final = spool / f"{_PREFIX}{name}"
        os.rename(scratch, final)
    except BaseException:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return final


def _try_lock(path: Path, create: bool = True) -> int | None:
    """The descriptor of ``path`` if this process got an exclusive ``flock`` on it, else None
    (an :class:`OSError` if it cannot be opened)."""
    fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def uploader_running(spool: Path) -> bool:
    fd = _try_lock(spool / LOCK_FILE)
    if fd is None:
        return True
    os.close(fd)
    return False


def start_uploader(spool: Path, environ: dict[str, str]) -> None:
    """Start a detached uploader for ``spool`` unless one runs (it re-checks, so a race between
    two starters ends with one uploader)."""
    import subprocess

    if uploader_running(spool):
        return
    spool = spool.absolute()  # it runs in / (the build's directory may go away first)
    subprocess.Popen(
        [sys.executable, "-m", "larder.client.uploads", str(spool)],
        cwd="/",
        env={**environ, "LARDER_STATE_DIR": str(spool.parents[1])},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,  # not cargo's pipes or jobserver: the build never waits for it
        start_new_session=True,
    )


def wait(spool: Path, environ: dict[str, str], seconds: float) -> bool:
    """Whether ``spool`` emptied within ``seconds``, jobs still being prepared (:func:`hold`)
    included (an uploader is started if none runs)."""
    deadline = time.monotonic() + seconds
    while (jobs := pending(spool)) or busy(spool):
        if jobs and not uploader_running(spool):
            start_uploader(spool, environ)
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL)
    return True


# -- the uploader ----------------------------------------------------------------------------


def _setting(environ: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    try:
        value = int(environ.get(name) or default)
    except ValueError:
        return default
    return value if low <= value <= high else default


def upload_nice(environ: dict[str, str]) -> int:
    """The niceness the uploader adds to its own: ``LARDER_UPLOAD_NICE`` (0-19), else 10."""
    return _setting(environ, "LARDER_UPLOAD_NICE", DEFAULT_NICE, 0, 19)


def upload_level(environ: dict[str, str]) -> int | None:
    """The zstd level blobs are sent at: ``LARDER_UPLOAD_ZSTD_LEVEL`` (-7 to 19), else 1;
    ``off``: the bytes as they are (None)."""
    if (environ.get("LARDER_UPLOAD_ZSTD_LEVEL") or "").strip().lower() == "off":
        return None
    return _setting(environ, "LARDER_UPLOAD_ZSTD_LEVEL", DEFAULT_LEVEL, -7, 19)


def send(job_dir: Path, job: dict[str, Any], remote: Any, level: int | None = None) -> int:
    """Upload one job (read from ``job_dir``) in order: blobs (as zstd streams of ``level``),
    manifest, direct entry, inputs document; the bytes sent."""
    from larder.client.remote import RemoteError
    from larder.protocol.rustc import parse_direct_entry

    before = int(remote.bytes_up)
    blobs: list[str] = job["blobs"]
    for blob_id in remote.missing(blobs):
        remote.put_blob(blob_id, job_dir / blob_id, level)
    remote.put_manifest(job["key"], job["manifest"].encode())
    remote.put_direct(job["direct_key"], parse_direct_entry(job["direct_entry"].encode()))
    if job.get("inputs"):
        # An older server, a document over its limit: the upload stands without it.
        with contextlib.suppress(RemoteError):
            remote.put_inputs(job["key"], job["inputs"].encode())
    return int(remote.bytes_up) - before


#: Open connections by (cache URL, token).
Remotes = dict[tuple[str, str | None], Any]


def drain(spool: Path, environ: dict[str, str], remotes: Remotes | None = None) -> None:
    """Send every job in ``spool``, counting each upload or failure in the stats.

    ``remotes`` ((cache URL, token) -> :class:`~larder.client.remote.Remote`) keeps connections open
    for the caller's next pass; without it they are closed on return."""
    import shutil

    from larder.client import stats as stats_mod
    from larder.client.remote import Remote, RemoteError, network_timeout
    from larder.errors import FormatError

    store = stats_mod.Stats(stats_mod.state_dir(environ))
    timeout = network_timeout(environ)
    level = upload_level(environ)
    offline = False
    # One connection for every job (a spool holds one cache's): no new handshake, TLS
    # included, per compilation. A connection the server closed meanwhile is reopened.
    own = remotes is None
    if remotes is None:
        remotes = {}
    try:
        while jobs := pending(spool):
            for job_dir in jobs:
                counters: dict[str, int]
                error: str | None = None
                detail: str | None = None
                if offline:
                    counters, error = {"errors": 1}, "offline"
                else:
                    try:
                        job = json.loads((job_dir / JOB_FILE).read_text())
                        # Each job goes with its own build's token (jobs queued before
                        # jobs carried one: the uploader's).
                        url = job["url"]
                        token = job.get("token", environ.get("LARDER_TOKEN")) or None
                        if (url, token) not in remotes:
                            remotes[url, token] = Remote(url, token, timeout, environ)
                        sent = send(job_dir, job, remotes[url, token], level)
                        counters = {"uploads": 1, "bytes_up": sent}
                    except RemoteError as exc:
                        counters, error, detail = {"errors": 1}, exc.kind, str(exc)
                        offline = exc.unreachable
                    except (FormatError, OSError, ValueError, KeyError, TypeError):
                        counters, error = {"errors": 1}, "upload-job"
                shutil.rmtree(job_dir, ignore_errors=True)
                with contextlib.suppress(OSError):
                    store.add(counters, error=error, detail=detail)
    finally:
        if own:
            close_all(remotes)


def _holds(fd: int, path: Path) -> bool:
    """Whether ``fd`` is still the file at ``path``: a state directory removed and made again
    while this uploader lingered has a lock file (and jobs) of its own, for another uploader."""
    try:
        held, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino)


def close_all(remotes: Remotes) -> None:
    for remote in remotes.values():
        remote.close()
    remotes.clear()


def run(spool: Path, environ: dict[str, str]) -> None:
    """The uploader: drain while holding the lock, linger, exit when nothing is left. The
    connection stays open from one job to the next while it lingers."""
    remotes: Remotes = {}
    try:
        while True:
            fd = _try_lock(spool / LOCK_FILE)
            if fd is None:
                return  # another uploader has it; it re-checks the spool before it exits
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for a look or a kill
                idle_since = time.monotonic()
                while time.monotonic() - idle_since < LINGER:
                    if not _holds(fd, spool / LOCK_FILE):
                        return  # the spool was removed (and made again): not this one's now
                    if pending(spool):
                        drain(spool, environ, remotes)
                        idle_since = time.monotonic()
                    else:
                        time.sleep(POLL)
            finally:
                os.close(fd)
            if not pending(spool):
                return
    finally:
        close_all(remotes)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m larder.client.uploads SPOOL", file=sys.stderr)
        return 2
    environ = dict(os.environ)
    with contextlib.suppress(OSError):
        os.nice(upload_nice(environ))
    run(Path(argv[0]), environ)
    return 0


if __name__ == "__main__":
    sys.exit(main())
