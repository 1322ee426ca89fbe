"""The resident process of :mod:`larder.client.resident`: serves calls on a Unix socket.

``python -m larder.client.resident_server SOCKET`` holds a ``flock`` on ``resident.lock`` beside
the socket (one per state directory), loads what a compilation needs, and then, for each
connection: checks that the caller is the same user and the same interpreter and copy of larder,
reads the call and the descriptors that came with it, and forks a child that becomes the caller
(its descriptors at the same numbers, directory, environment, umask) and runs the call. It exits
after :data:`~larder.client.resident.IDLE` seconds without a call, after
:data:`~larder.client.resident.MAX_AGE` seconds, or once a module it loaded changed on disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

from larder.client import digests
from larder.client.resident import (
    DONE,
    EXEC,
    GO,
    HELLO,
    IDLE,
    LOCK_NAME,
    LOST,
    MAGIC,
    MAX_AGE,
    MAX_FDS,
    REFUSED,
    TAKEN,
    identity,
    package_dir,
    peer_uid,
)


class Abandoned(Exception):
    """The caller did not say GO to ``TAKEN``: it compiles by itself, so this child must not."""


class Call:
    """A call as the resident process received it."""

    def __init__(self, payload: bytes) -> None:
        """Parse what :func:`larder.client.resident.encode_call` made; ``ValueError`` if not."""
        fields = payload.split(b"\0")
        if len(fields) < 9:
            raise ValueError("a call with too few fields")
        self.identity = fields[0] + b"\0" + fields[1]
        self.cwd = os.fsdecode(fields[2])
        self.umask = int(fields[3])
        self.ppid = int(fields[4])
        self.startup = float(fields[5])
        self.fds = [int(fd) for fd in fields[6].split(b",")] if fields[6] else []
        count = int(fields[7])
        self.argv = [os.fsdecode(arg) for arg in fields[8 : 8 + count]]
        if len(self.argv) != count or not self.argv:
            raise ValueError("a call without its command line")
        self.environ = {}
        for item in fields[8 + count :]:
            name, sep, value = item.partition(b"=")
            if sep:
                self.environ[os.fsdecode(name)] = os.fsdecode(value)


def _module_times() -> dict[str, int]:
    """Modification times of the larder modules this process loaded."""
    package = package_dir()
    times = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and os.path.abspath(path).startswith(package + os.sep):
            try:
                times[path] = os.stat(path).st_mtime_ns
            except OSError:
                times[path] = -1
    return times


def _changed(times: dict[str, int]) -> bool:
    for path, stamp in times.items():
        try:
            if os.stat(path).st_mtime_ns != stamp:
                return True
        except OSError:
            return True
    return False


def _preload() -> None:
    """What a compilation loads, so each child has it already."""
    import mmap  # noqa: F401
    import subprocess  # noqa: F401

    import zstandard  # noqa: F401

    import larder.client.explain
    import larder.client.linker
    import larder.client.shim
    import larder.client.uploads
    import larder.protocol.inputs  # noqa: F401


def serve(path: str) -> int:
    """Serve calls on the Unix socket ``path`` until idle, too old or outdated."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    lock = os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # another one serves this directory
    _preload()
    digests.attach(Path(directory))
    times = _module_times()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    mask = os.umask(0o177)  # the socket is the user's alone
    try:
        listener.bind(path)
    finally:
        os.umask(mask)
    bound = os.stat(path).st_ino
    listener.listen(64)
    listener.settimeout(1.0)
    started = last = time.monotonic()
    try:
        while True:
            _reap()
            now = time.monotonic()
            if now - last > IDLE or now - started > MAX_AGE or _changed(times):
                break
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                time.sleep(0.1)  # out of descriptors, say: the caller compiles by itself
                continue
            last = time.monotonic()
            with conn:
                _take(conn, listener, lock, last)
    finally:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == bound:
                os.unlink(path)
        listener.close()
    return 0


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _receive(conn: socket.socket) -> tuple[bytes, list[int]]:
    """The call's bytes and the descriptors that came with them."""
    fds: list[int] = []
    data, ancillary, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * 4))
    for level, kind, blob in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(blob) - len(blob) % 4
            fds.extend(
                int.from_bytes(blob[i : i + 4], sys.byteorder, signed=True)
                for i in range(0, usable, 4)
            )
    try:
        if len(data) < 8 or data[:4] != MAGIC:
            raise ValueError("not a call")
        size = int.from_bytes(data[4:8], "big")
        while len(data) < size + 8:
            piece = conn.recv(size + 8 - len(data))
            if not piece:
                raise ValueError("a call cut short")
            data += piece
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return data[8:], fds


def _take(conn: socket.socket, listener: socket.socket, lock: int, accepted: float) -> None:
    """In the resident process: check the caller, read its call and fork a child to run it."""
    conn.settimeout(2.0)
    try:
        if peer_uid(conn) != os.getuid():
            conn.sendall(REFUSED)
            return
        conn.sendall(HELLO)
        payload, fds = _receive(conn)
    except (OSError, ValueError):
        return
    try:
        call = Call(payload)
        if call.identity != identity() or len(call.fds) != len(fds):
            conn.sendall(REFUSED)
            return
        digests.refresh()  # the child starts with what the calls before it hashed
        pid = os.fork()
        if pid == 0:
            listener.close()
            os.close(lock)
            _child(conn, call, fds, accepted)  # never returns
    except (OSError, ValueError):
        pass
    finally:
        for fd in fds:
            os.close(fd)


def _install_fds(conn: socket.socket, targets: list[int], received: list[int]) -> socket.socket:
    """Put each received descriptor at the caller's number; the connection moves above them."""
    floor = max([*targets, *received, conn.fileno(), 2]) + 1
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor) for fd in received]
    for fd in received:
        os.close(fd)
    connection = socket.socket(fileno=fcntl.fcntl(conn.fileno(), fcntl.F_DUPFD_CLOEXEC, floor))
    conn.close()
    connection.settimeout(None)  # blocking: the handshake's timeout made the descriptor not
    for source, target in zip(moved, targets, strict=True):
        os.dup2(source, target, inheritable=True)
        os.close(source)
    for fd in (0, 1, 2):
        if fd not in targets:
            os.close(fd)  # closed in the caller too
    return connection


def _fresh_stdio() -> None:
    """``sys.stdin``/``stdout``/``stderr`` on the caller's descriptors, buffered as at start."""
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            setattr(sys, name, None)
            continue
        raw = io.FileIO(fd, "r" if fd == 0 else "w", closefd=False)
        buffered = io.BufferedReader(raw) if fd == 0 else io.BufferedWriter(raw)
        stream = io.TextIOWrapper(
            buffered,
            encoding="utf-8",
            errors="backslashreplace" if fd == 2 else "strict",
            line_buffering=fd == 2 or os.isatty(fd),
        )
        setattr(sys, name, stream)


def _child(conn: socket.socket, call: Call, received: list[int], accepted: float) -> None:
    """A forked child: become the caller, run its call, report the exit code, exit."""
    code = LOST
    started, finished, released = threading.Event(), threading.Event(), threading.Event()
    try:
        os.setpgid(0, 0)
        # Stopped by _watch (the caller hung up: Ctrl-C): unwind, so what the call wrote
        # half (a download beside its output) is removed on the way out.
        signal.signal(signal.SIGTERM, _unwind)
        connection = _install_fds(conn, call.fds, received)
        received.clear()  # closed by _install_fds; the parent closes its own copies
        os.chdir(call.cwd)
        os.umask(call.umask)
        os.environ.clear()
        os.environ.update(call.environ)
        sys.argv = ["larder-rustc", *call.argv]
        _fresh_stdio()

        from larder.client import explain
        from larder.client.shim import compile_call

        explain.PARENT_PID = call.ppid

        def taken() -> None:
            connection.sendall(TAKEN)
            if connection.recv(1) != GO:  # the caller gave up waiting: it compiles by itself
                raise Abandoned()
            started.set()
            threading.Thread(target=_watch, args=(connection, finished), daemon=True).start()

        def answer(message: bytes) -> None:
            _flush_stdio()  # before the caller exits with the code
            finished.set()  # the caller hangs up once it has the code: not a reason to kill
            connection.sendall(message)

        def release(result: int) -> None:
            answer(DONE + result.to_bytes(4, "big", signed=True))
            released.set()
            _let_go(call.fds)
            from larder.client.uploads import upload_nice

            with contextlib.suppress(OSError):  # the rest is the uploader's kind of work
                os.nice(upload_nice(call.environ))

        startup = call.startup + (time.monotonic() - accepted) * 1000
        result = compile_call(call.argv, dict(call.environ), startup, taken, release)
        if result is None:
            answer(EXEC)
            code = 0
        else:
            if not released.is_set():
                answer(DONE + result.to_bytes(4, "big", signed=True))
            code = result
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except Abandoned:
        code = 0
    except BaseException:
        if released.is_set():
            code = 0  # the caller has its code; what failed after is the shim's to count
        else:
            if started.is_set():  # else the caller compiles by itself, and meets it there
                traceback.print_exc()  # on the caller's stderr, as the shim in the caller would
            code = LOST
    finally:
        with contextlib.suppress(BaseException):
            _flush_stdio()
        os._exit(code & 0xFF)


def _unwind(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _let_go(fds: list[int]) -> None:
    """Give back the caller's descriptors (stdio to ``/dev/null``, the rest closed), so cargo
    sees the end of rustc's output and holds no pipe open for this child."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in fds:
        if fd > 2:
            with contextlib.suppress(OSError):
                os.close(fd)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()


def _watch(connection: socket.socket, finished: threading.Event) -> None:
    """Until the caller hangs up; if that happens before the call finished, stop everything
    this child started (its process group: rustc too)."""
    with contextlib.suppress(OSError):
        connection.recv(1)
    if not finished.is_set():
        os.killpg(0, signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m larder.client.resident_server SOCKET", file=sys.stderr)
        return 2
    return serve(argv[0])


if __name__ == "__main__":
    sys.exit(main())
