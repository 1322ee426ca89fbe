"""A resident process that runs ``larder-rustc`` compilations, so a call skips loading the shim.

Cargo starts a new ``larder-rustc`` for every compilation, and loading the shim's modules costs
about three times what starting the interpreter does (some 30 ms of CPU per call, most of what a
hit costs). The first call of a build that finds no resident process starts one (``python -m
larder.client.resident_server SOCKET``, detached, like the uploader) and compiles by itself; the
calls after it connect to ``SOCKET`` (:data:`SOCKET_NAME` in the state directory), hand over their
command line, working directory, environment, umask and every descriptor rustc would inherit
(stdin, stdout, stderr, cargo's jobserver pipes) with ``SCM_RIGHTS``, and wait for the exit code.
The resident process forks a child per call. The child takes the caller's descriptors at the same
numbers, its directory, environment and umask, runs the call as the shim in the caller would
(:func:`larder.client.shim.compile_call`) and reports the code; a call that is not a compilation
comes back to the caller, which becomes rustc as before. The child has a process group of its
own: when the caller goes away (cargo killed it, Ctrl-C), the connection ends and the child kills
its group, rustc with it.

A call never depends on the resident process for its result. It sends nothing before the
resident process greeted it (:data:`HELLO`, once it accepted the connection and checked the
peer): descriptors in flight to a process that never accepts (stopped, frozen) would keep
cargo's pipes open after the caller gave up. It compiles by itself when it cannot connect, when
it is not greeted within :data:`HANDSHAKE_TIMEOUT`, when it is refused (the peer is another
user, another interpreter or copy of larder, or runs under other resource limits, niceness or
control groups), or when the connection ends before the child took the call. Once the child
took it, rustc may have printed or written, so a lost connection fails the call (exit 101)
rather than compiling twice.
``LARDER_RESIDENT=0`` turns the resident process off.

The resident process serves one user from one state directory, and exits after :data:`IDLE`
seconds without a call, after :data:`MAX_AGE` seconds, or as soon as a module it loaded changed
on disk (an upgrade): it never runs older code than a new process would load.

This module is the caller's side and what both sides share; :mod:`larder.client.resident_server`
is the resident process. It is imported by every compilation's entry point: at module level it
uses only what the interpreter has loaded at start (``os``, ``sys``) and ``_socket``.
"""

import _socket
import os
import sys

from larder.client.probe import state_dir_name

#: Seconds without a call after which the resident process exits.
IDLE = 20.0
#: Seconds after which it exits even when busy (it is started again on demand).
MAX_AGE = 3600.0
#: Seconds a caller waits to connect and to hear whether its call was taken.
HANDSHAKE_TIMEOUT = 10.0
#: The first bytes of a call.
MAGIC = b"LRS1"
#: Answers of the child: the call is taken (an exit code follows as ``DONE`` + 4 bytes), it is
#: not a compilation (the caller becomes rustc), or refused (the caller compiles by itself).
TAKEN, DONE, EXEC, REFUSED = b"T", b"D", b"E", b"R"
#: The caller's answer to ``TAKEN``: go on. Only then does the child run the call: a caller
#: that gave up waiting for ``TAKEN`` compiles by itself, and the call must not run twice (cargo
#: told twice that a crate's metadata is ready panics).
GO = b"G"
#: The resident process's first byte on a connection it accepted from its own user.
HELLO = b"H"
#: What :func:`_hand_over` returns when no greeting came within :data:`HANDSHAKE_TIMEOUT`.
STALLED = b"stalled"
#: More descriptors than one message carries (the kernel's limit is 253): no delegation.
MAX_FDS = 240
#: Longest socket path (``sun_path`` holds 108 bytes with its NUL).
MAX_PATH = 107
#: Exit code of a call whose child vanished after taking it.
LOST = 101
SOCKET_NAME = "resident-3.sock"  # 3: the caller answers TAKEN with GO
#: Held (``flock``) by the resident process; its time is that of the last start.
LOCK_NAME = "resident.lock"
#: Seconds between two starts of a resident process for one state directory.
RESTART_AFTER = 10.0
FALSE_VALUES = ("0", "false", "no", "off")


def socket_path(environ: "os._Environ[str] | dict[str, str]") -> str:
    return os.path.join(os.path.abspath(state_dir_name(environ)), SOCKET_NAME)


def package_dir() -> str:
    """The directory of this copy of the ``larder`` package."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def identity() -> bytes:
    """What a caller and the resident process must share: the interpreter and larder's copy,
    and what the kernel applies to the process and its children: resource limits, niceness and
    control groups (a call run under another build's ``ulimit -f``, ``nice`` or memory limit
    could fail where the caller's own rustc would not, or take the machine from others)."""
    return os.fsencode(sys.executable) + b"\0" + os.fsencode(package_dir()) + _context()


def _context() -> bytes:
    parts = [b"\x01nice=%d" % os.nice(0)]
    for name in ("/proc/self/limits", "/proc/self/cgroup"):
        try:
            with open(name, "rb") as found:
                parts.append(found.read().replace(b"\0", b""))
        except OSError:
            parts.append(b"-")
    return b"\x01".join(parts)


def enabled(environ: "os._Environ[str] | dict[str, str]") -> bool:
    """On unless ``LARDER_RESIDENT`` says no, where peer credentials and ``/proc`` exist
    (Linux)."""
    if environ.get("LARDER_RESIDENT", "1").lower() in FALSE_VALUES:
        return False
    return hasattr(_socket, "SO_PEERCRED") and os.path.isdir("/proc/self/fd")


# -- the caller -------------------------------------------------------------------------------


def _inherited_fds(skip: int) -> list[int]:
    """Descriptors rustc would inherit from this process (open, not close-on-exec)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd == skip:
            continue
        try:
            if os.get_inheritable(fd):
                found.append(fd)
        except OSError:  # the descriptor listdir itself used, already closed
            continue
    return sorted(found)


def encode_call(argv: list[str], fds: list[int], startup: float) -> bytes:
    """The call as sent: NUL-separated fields after :data:`MAGIC` and a 4-byte length."""
    fields = [
        identity(),
        os.fsencode(os.getcwd()),
        b"%d" % _umask(),
        b"%d" % os.getppid(),
        b"%.3f" % startup,
        b",".join(b"%d" % fd for fd in fds),
        b"%d" % len(argv),
        *(os.fsencode(arg) for arg in argv),
        *(os.fsencode(k) + b"=" + os.fsencode(v) for k, v in os.environ.items()),
    ]
    payload = b"\0".join(fields)
    return MAGIC + len(payload).to_bytes(4, "big") + payload


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def peer_uid(sock: "_socket.socket") -> int:
    """The user id of the process at the other end of a Unix socket (-1 if unknown)."""
    try:
        creds = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    except OSError:
        return -1
    return int.from_bytes(creds[4:8], sys.byteorder)  # struct ucred: pid, uid, gid


def _recv_exact(sock: "_socket.socket", size: int) -> bytes:
    data = b""
    while len(data) < size:
        piece = sock.recv(size - len(data))
        if not piece:
            break
        data += piece
    return data


#: What :func:`delegate` returns when this process must compile by itself: no resident process
#: listens (one should be started), or the one there declined or vanished.
ABSENT, DECLINED = "absent", "declined"


def delegate(argv: list[str], startup: float) -> int | str:
    """Run the call ``argv`` (``RUSTC ARGS...``) in the resident process: its exit code, or
    :data:`ABSENT` / :data:`DECLINED` when this process must compile by itself. A call that is
    not a compilation never returns: this process becomes rustc."""
    path = socket_path(os.environ)
    if len(os.fsencode(path)) > MAX_PATH:
        return DECLINED
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(HANDSHAKE_TIMEOUT)
        try:
            bound = _file_identity(path)
            sock.connect(path)
        except OSError:
            return ABSENT
        if peer_uid(sock) != os.getuid():
            return DECLINED  # not ours: it would get this call's environment, tokens included
        answer = _hand_over(sock, argv, startup)
        if answer == STALLED:
            # Not greeted in time (stopped, frozen): the calls after this one must not wait
            # too. Its socket goes; it exits idle once it runs again, and another starts.
            try:
                if _file_identity(path) == bound:
                    os.unlink(path)
            except OSError:
                pass
            return DECLINED
        if answer == EXEC:
            sock.close()
            try:
                os.execvp(argv[0], argv)
            except OSError as exc:
                print(f"larder-rustc: cannot run {argv[0]}: {exc}", file=sys.stderr)
                return 127
        if answer != TAKEN:
            return DECLINED  # refused, or gone before taking the call (it will not run it)
        try:
            sock.sendall(GO)
        except OSError:
            return DECLINED  # the child never hears GO: it does not run the call
        sock.settimeout(None)  # a compilation takes as long as it takes
        try:
            done = _recv_exact(sock, 5)
        except OSError:
            done = b""
        if len(done) == 5 and done[:1] == DONE:
            return int.from_bytes(done[1:], "big", signed=True)
        print("larder-rustc: the resident process ended during the compilation", file=sys.stderr)
        return LOST
    except KeyboardInterrupt:  # Ctrl-C: closing the connection stops the compilation
        return 130
    finally:
        sock.close()


def _file_identity(path: str) -> tuple[int, int, int]:
    """What tells one socket file from another bound later at the same path (inode numbers
    are reused): device, inode and change time."""
    found = os.stat(path)
    return found.st_dev, found.st_ino, found.st_ctime_ns


def _hand_over(sock: "_socket.socket", argv: list[str], startup: float) -> bytes:
    """Send the call with this process's inheritable descriptors; the first answer (empty when
    the call could not be handed over)."""
    try:
        # Nothing (descriptors least of all) is sent before the resident process accepted the
        # connection: descriptors in flight to a process that never accepts keep cargo's pipes
        # open after this caller gave up and compiled by itself.
        try:
            greeting = sock.recv(1)
        except TimeoutError:
            return STALLED
        if greeting != HELLO:
            return b""
        fds = _inherited_fds(sock.fileno())
        if len(fds) > MAX_FDS:
            return b""
        message = encode_call(argv, fds, startup)
        rights = b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in fds)
        ancillary = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)] if fds else []
        sent = sock.sendmsg([message], ancillary)
        sock.sendall(message[sent:])
        return sock.recv(1)
    except OSError:  # gone, timed out, or this process's directory vanished
        return b""


def start(environ: dict[str, str]) -> None:
    """Start a detached resident process for this state directory, unless one was started in
    the last :data:`RESTART_AFTER` seconds (where sockets cannot be made, the calls do not pay
    for a failing start each time; one that finds another serving exits at once)."""
    import subprocess
    import time

    path = socket_path(environ)
    if not enabled(environ) or len(os.fsencode(path)) > MAX_PATH:
        return
    directory = os.path.dirname(path)
    stamp = os.path.join(directory, LOCK_NAME)
    try:
        os.makedirs(directory, exist_ok=True)
        try:
            if time.time() - os.stat(stamp).st_mtime < RESTART_AFTER:
                return
        except FileNotFoundError:
            pass
        os.close(os.open(stamp, os.O_WRONLY | os.O_CREAT, 0o600))
        os.utime(stamp)
        subprocess.Popen(
            [sys.executable, "-m", "larder.client.resident_server", path],
            cwd="/",
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=True,  # not cargo's pipes: the build never waits for it
            start_new_session=True,
        )
    except OSError:
        pass
