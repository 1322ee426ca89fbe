"""What the entry point decides before importing anything: is the cache on, is this a probe.

A leaf module (it imports only ``os`` and ``stat``, loaded at interpreter start anyway) shared by
:mod:`larder.client.entry`, which must stay cheap, and by :mod:`larder.client.args` and
:mod:`larder.client.shim`, which the entry point imports only for a compilation.
"""

# No `from __future__ import annotations`: importing __future__ costs the probe path ~0.2 ms.
import os
import stat

# A command line with one of these flags asks rustc for information, not a compilation.
NOT_COMPILATION_FLAGS = frozenset(
    {"--print", "--explain", "-V", "--version", "-vV", "-h", "--help"}
)
TRUE_VALUES = ("1", "true", "yes", "on")


def is_probe(args: list[str]) -> bool:
    """Whether rustc ``args`` ask for information (``--print=x`` counts as ``--print``)."""
    return any(arg.partition("=")[0] in NOT_COMPILATION_FLAGS for arg in args)


def cache_enabled(environ: os._Environ[str] | dict[str, str]) -> bool:
    disabled = environ.get("LARDER_DISABLE", "").lower() in TRUE_VALUES
    return bool(environ.get("LARDER_URL")) and not disabled


def state_dir_name(environ: os._Environ[str] | dict[str, str]) -> str:
    """``$LARDER_STATE_DIR``, else ``$XDG_CACHE_HOME/larder``, else ``~/.cache/larder``. A
    relative value is ignored (as the XDG specification says of ``XDG_CACHE_HOME``): cargo runs
    each rustc in its package's directory, so it would name a state directory per package, and
    ``--stats`` or ``--wait-uploads`` in the workspace yet another.

    One that cannot be written (a read-only home of a CI user), or that another user owns
    (``sudo`` keeping ``HOME``: root would write through that user's links, and leave files the
    user cannot replace), gives way to :func:`private_fallback`: without a state directory
    nothing is uploaded."""
    state = environ.get("LARDER_STATE_DIR")
    if not (state and os.path.isabs(state)):
        base = environ.get("XDG_CACHE_HOME") or ""
        if not os.path.isabs(base):
            base = os.path.join(os.path.expanduser("~"), ".cache")
        state = os.path.join(base, "larder")
    if _writable(state):
        return state
    return private_fallback(environ) or state


def _writable(path: str) -> bool:
    """Whether ``path`` is a directory of this user's that it may write, or could be made."""
    if os.path.isdir(path):
        try:
            owner = os.stat(path).st_uid
        except OSError:
            return False
        return owner == os.geteuid() and os.access(path, os.W_OK | os.X_OK)
    while not os.path.isdir(path):
        if os.path.lexists(path):
            return False  # a file (or a dangling link) is in the way
        parent = os.path.dirname(path)
        if parent == path:
            return False
        path = parent
    return os.access(path, os.W_OK | os.X_OK)


def private_fallback(environ: os._Environ[str] | dict[str, str]) -> str | None:
    """``$XDG_RUNTIME_DIR/larder`` (``/run/user/<uid>``, private by construction), else
    ``/tmp/larder-<uid>``; used only while it is this user's alone (made 0700; one that another
    user owns, others may write, or that is a link, is not). Not ``$TMPDIR``, which differs
    from one shell to the next (``nix develop``, pam_tmpdir): ``--wait-uploads`` must find the
    spool the build used. None if neither can be had."""
    runtime = environ.get("XDG_RUNTIME_DIR") or ""
    candidates = [os.path.join(runtime, "larder")] if os.path.isabs(runtime) else []
    for path in [*candidates, f"/tmp/larder-{os.geteuid()}"]:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError:
            continue
        try:
            found = os.lstat(path)
        except OSError:
            continue
        mine = stat.S_ISDIR(found.st_mode) and found.st_uid == os.geteuid()
        if mine and not found.st_mode & 0o022:
            return path
    return None


def startup_ms() -> float:
    """Milliseconds from this process's start until now (interpreter, imports); from ``/proc``
    (10 ms ticks), 0 where there is none."""
    try:
        with open("/proc/self/stat") as stat:
            ticks = int(stat.read().rpartition(")")[2].split()[19])
        with open("/proc/uptime") as uptime:
            up = float(uptime.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max((up - ticks / os.sysconf("SC_CLK_TCK")) * 1000, 0.0)
