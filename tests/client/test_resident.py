"""The resident process runs a call as the caller would have, and never decides its outcome."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from larder.client import resident, resident_server, uploads

if TYPE_CHECKING:
    from tests.client.test_uploads import UploadSink

RUSTC = shutil.which("rustc") or "rustc"
LIB = ["--crate-name", "t", "--edition=2021", "src/lib.rs", "--crate-type", "lib",
       "--emit=dep-info,metadata,link", "-C", "extra-filename=-x", "--out-dir", "out"]  # fmt: skip
REPORT_FD = 7  # where the test's rustc reports, as cargo's jobserver pipes are passed on


def reporting_rustc(where: Path, body: str = "") -> Path:
    """A rustc that writes, for a compilation, its directory, an environment variable, its
    umask and its grandparent's pid to descriptor 7 (inherited from the caller), then runs
    ``body`` (default: the real rustc)."""
    script = where / "rustc"
    script.write_text(
        "#!/bin/sh\n"
        'case "$*" in *--crate-name*)\n'
        "  grand=$(cut -d' ' -f4 /proc/$PPID/stat)\n"
        f'  echo "cwd=$PWD foo=$LARDER_TEST_FOO umask=$(umask) grand=$grand pid=$$" >&{REPORT_FD}\n'
        f"  {body or ':'} ;;\n"
        "esac\n"
        f'exec {RUSTC} "$@"\n'
    )
    script.chmod(0o755)
    return script


def environ(crate: Path) -> dict[str, str]:
    return {
        **os.environ,
        "LARDER_URL": "http://127.0.0.1:9/main",  # nothing listens: every call compiles
        "LARDER_STATE_DIR": str(crate / "state"),
        "LARDER_TIMEOUT": "0.5",
        "LARDER_TEST_FOO": "bar",
    }


class Resident:
    def __init__(self, path: Path, idle: float = 60.0) -> None:
        self.path = path
        self.proc = subprocess.Popen(
            [sys.executable, "-c",
             "import sys, larder.client.resident_server as r; r.IDLE = float(sys.argv[2]); "
             "sys.exit(r.serve(sys.argv[1]))", str(self.path), str(idle)],
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not self.path.exists():
            assert self.proc.poll() is None, "the resident process exited"
            assert time.monotonic() < deadline, "no socket"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def server(crate: Path) -> Iterator[Resident]:
    running = Resident(crate / "state" / resident.SOCKET_NAME)
    yield running
    running.stop()


def call(
    crate: Path,
    argv: list[str],
    env: dict[str, str] | None = None,
    also: Callable[[], None] | None = None,
) -> tuple[subprocess.CompletedProcess[str], str]:
    """``larder-rustc ARGV`` from ``crate`` with umask 027 and a pipe at descriptor 7 (and
    ``also`` run in the child first); its result and what was written to the pipe."""
    read, write = os.pipe()

    def prepare() -> None:
        os.dup2(write, REPORT_FD)
        os.umask(0o027)
        if also is not None:
            also()

    try:
        done = subprocess.run(
            [sys.executable, "-m", "larder.client.entry", *argv],
            cwd=crate,
            env=env or environ(crate),
            capture_output=True,
            text=True,
            timeout=120,
            close_fds=False,  # (Python's own descriptors are not inheritable: only 0-2 and 7)
            preexec_fn=prepare,
        )
    finally:
        os.close(write)
    with os.fdopen(read) as report:
        return done, report.read()


def test_a_call_runs_in_the_resident_process_as_the_caller(crate: Path, server: Resident) -> None:
    rustc = reporting_rustc(crate)
    done, report = call(crate, [str(rustc), *LIB])
    assert done.returncode == 0, done.stderr
    assert (crate / "out" / "libt-x.rlib").is_file()
    line = report.strip()
    assert f"cwd={crate} foo=bar umask=0027" in line
    # rustc's parent is the child the resident process forked for this call
    assert f"grand={server.proc.pid} " in line + " "
    stats = (crate / "state" / "stats.json").read_text()
    assert '"misses": 1' in stats or '"errors": 1' in stats


def test_compile_errors_and_exit_codes_come_back(crate: Path, server: Resident) -> None:
    (crate / "src" / "lib.rs").write_text("pub fn answer() -> u32 { nope }\n")
    done, _ = call(crate, [str(reporting_rustc(crate)), *LIB])
    assert done.returncode == 1
    assert "cannot find value `nope`" in done.stderr


def test_without_a_resident_process_the_caller_compiles_and_starts_one(crate: Path) -> None:
    done, report = call(crate, [str(reporting_rustc(crate)), *LIB])
    assert done.returncode == 0, done.stderr
    # compiled by the caller: rustc's grandparent is this test
    assert f"grand={os.getpid()} " in report + " "
    path = crate / "state" / resident.SOCKET_NAME
    deadline = time.monotonic() + 30
    while not path.exists():
        assert time.monotonic() < deadline, "no resident process was started"
        time.sleep(0.05)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    _stop_serving(path)


def _stop_serving(path: Path) -> None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(path).encode() in cmdline and b"larder.client.resident_server" in cmdline:
                os.kill(int(entry.name), signal.SIGTERM)


def test_resident_off_means_in_process(crate: Path, server: Resident) -> None:
    done, report = call(
        crate, [str(reporting_rustc(crate)), *LIB], {**environ(crate), "LARDER_RESIDENT": "0"}
    )
    assert done.returncode == 0, done.stderr
    assert f"grand={os.getpid()} " in report + " "


def test_a_call_that_is_not_a_compilation_runs_rustc_in_the_caller(
    crate: Path, server: Resident
) -> None:
    script = crate / "rustc"
    script.write_text(f'#!/bin/sh\necho "parent=$PPID args=$*" >&{REPORT_FD}\nexit 3\n')
    script.chmod(0o755)
    done, report = call(crate, [str(script), "--cfg", "x"])
    assert done.returncode == 3
    assert report.strip() == f"parent={os.getpid()} args=--cfg x"  # the caller became it


def test_killing_the_caller_stops_its_compilation(crate: Path, server: Resident) -> None:
    pidfile = crate / "rustc.pid"
    rustc = reporting_rustc(crate, body=f"echo $$ > {pidfile}; exec sleep 60")
    read, write = os.pipe()
    caller = subprocess.Popen(
        [sys.executable, "-m", "larder.client.entry", str(rustc), *LIB],
        cwd=crate,
        env=environ(crate),
        close_fds=False,
        preexec_fn=lambda: os.dup2(write, REPORT_FD),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write)
    deadline = time.monotonic() + 60
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline and caller.poll() is None
        time.sleep(0.05)
    sleeper = int(pidfile.read_text())
    caller.kill()
    caller.wait()
    deadline = time.monotonic() + 10
    while _alive(sleeper):
        assert time.monotonic() < deadline, "the compilation outlived its caller"
        time.sleep(0.05)
    os.close(read)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def _send(path: Path, data: bytes) -> bytes:
    """The resident process's answer to ``data``, sent once it greeted the connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        assert sock.recv(1) == resident.HELLO
        sock.sendall(data)
        return sock.recv(1)


def test_another_copy_of_larder_is_refused_and_garbage_ignored(
    crate: Path, server: Resident, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _send(server.path, b"GET / HTTP/1.1\r\n\r\n" + b"x" * 100) == b""
    short = b"x\0y\0z"
    assert _send(server.path, resident.MAGIC + len(short).to_bytes(4, "big") + short) == b""
    assert _send(server.path, resident.MAGIC + (1 << 20).to_bytes(4, "big") + b"cut") == b""
    monkeypatch.setattr(resident, "identity", lambda: b"/other/python\0/other/larder")
    monkeypatch.chdir(crate)
    message = resident.encode_call([RUSTC, *LIB], [], 0.0)
    assert _send(server.path, message) == resident.REFUSED
    monkeypatch.undo()
    # still serving
    done, report = call(crate, [str(reporting_rustc(crate)), *LIB])
    assert done.returncode == 0, done.stderr
    assert f"grand={server.proc.pid} " in report + " "


@pytest.mark.parametrize("context", ["nice", "ulimit-f"])
def test_a_call_under_other_limits_compiles_by_itself(
    crate: Path, server: Resident, context: str
) -> None:
    """The resident process runs calls with the limits and niceness of the build that started
    it: a call from another context (``ulimit -f``, ``nice``) is refused and compiles in the
    caller, under its own."""

    def other() -> None:
        if context == "nice":
            os.nice(5)
        else:
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 30, resource.RLIM_INFINITY))

    done, report = call(crate, [str(reporting_rustc(crate)), *LIB], also=other)
    assert done.returncode == 0, done.stderr
    assert f"grand={server.proc.pid} " not in report + " "
    done, report = call(crate, [str(reporting_rustc(crate)), *LIB])  # its own context: taken
    assert f"grand={server.proc.pid} " in report + " "


def test_the_resident_process_exits_when_idle(tmp_path: Path) -> None:
    idle = Resident(tmp_path / "state" / resident.SOCKET_NAME, idle=0.3)
    assert idle.proc.wait(15) == 0
    assert not idle.path.exists()


def test_a_changed_module_is_noticed(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("")
    times = {str(module): module.stat().st_mtime_ns}
    assert not resident_server._changed(times)
    os.utime(module, ns=(0, module.stat().st_mtime_ns + 1))
    assert resident_server._changed(times)
    module.unlink()
    assert resident_server._changed(times)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to listen as another user")
def test_a_socket_served_by_another_user_gets_nothing(crate: Path) -> None:
    shared = Path(tempfile.mkdtemp(prefix="larder-shared-state-"))  # a state directory anyone
    shared.chmod(0o777)  # may write to (where the test's own tmp_path is root's alone)
    path = shared / resident.SOCKET_NAME
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # someone else's process at the caller's socket path
        try:
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
                listener.bind(str(path))
                listener.listen(1)
                os.write(write, b"listening\n")
                listener.settimeout(30)
                conn, _ = listener.accept()
                conn.settimeout(10)
                os.write(write, b"sent something\n" if conn.recv(100) else b"sent nothing\n")
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as heard:
        assert heard.readline() == "listening\n"
        env = {**environ(crate), "LARDER_STATE_DIR": str(shared)}
        done, report = call(crate, [str(reporting_rustc(crate)), *LIB], env)
        assert done.returncode == 0, done.stderr
        assert f"grand={os.getpid()} " in report + " "  # compiled by the caller itself
        assert heard.readline() == "sent nothing\n"
    os.waitpid(pid, 0)
    _stop_serving(path)  # the caller started a resident process of its own there
    shutil.rmtree(shared, ignore_errors=True)


def test_where_no_socket_can_be_made_calls_do_not_keep_starting_one(crate: Path) -> None:
    (crate / "state" / resident.SOCKET_NAME).mkdir(parents=True)  # a directory: bind fails
    rustc = reporting_rustc(crate)
    stamp = crate / "state" / resident.LOCK_NAME
    started = []
    for _ in range(3):
        done, report = call(crate, [str(rustc), *LIB])
        assert done.returncode == 0, done.stderr
        assert f"grand={os.getpid()} " in report + " "  # compiled by the caller
        started.append(stamp.stat().st_mtime_ns)
    assert started[0] == started[1] == started[2]  # one start in RESTART_AFTER seconds


def test_concurrent_calls_each_get_their_own_child(crate: Path, server: Resident) -> None:
    rustc = reporting_rustc(crate)
    for name in ("a", "b", "c", "d"):
        (crate / "src" / f"{name}.rs").write_text(f"pub fn {name}() -> u8 {{ 1 }}\n")
    read, write = os.pipe()
    callers = [
        subprocess.Popen(
            [sys.executable, "-m", "larder.client.entry", str(rustc), "--crate-name", name,
             "--edition=2021", f"src/{name}.rs", "--crate-type", "lib", "--emit=link",
             "--out-dir", "out"],
            cwd=crate, env=environ(crate), close_fds=False,
            preexec_fn=lambda: os.dup2(write, REPORT_FD),
        )
        for name in ("a", "b", "c", "d")
    ]  # fmt: skip
    os.close(write)
    codes = [caller.wait(120) for caller in callers]
    with os.fdopen(read) as report:
        lines = report.read().splitlines()
    assert codes == [0, 0, 0, 0]
    assert len(lines) == 4 and all(f"grand={server.proc.pid} " in line + " " for line in lines)
    assert len({line.rpartition("pid=")[2] for line in lines}) == 4
    for name in ("a", "b", "c", "d"):
        assert (crate / "out" / f"lib{name}.rlib").is_file()


def test_a_changed_module_ends_the_resident_process(tmp_path: Path, crate: Path) -> None:
    import larder

    copy = tmp_path / "copy"
    shutil.copytree(Path(larder.__file__).parent, copy / "larder")
    env = {**environ(crate), "PYTHONPATH": str(copy)}
    path = crate / "state" / resident.SOCKET_NAME
    proc = subprocess.Popen(
        [sys.executable, "-m", "larder.client.resident_server", str(path)], env=env, cwd=copy
    )
    deadline = time.monotonic() + 30
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    done, report = call(crate, [str(reporting_rustc(crate)), *LIB], env)
    assert done.returncode == 0, done.stderr
    assert f"grand={proc.pid} " in report + " "  # that copy served the call
    shim = copy / "larder" / "client" / "shim.py"
    os.utime(shim, ns=(0, shim.stat().st_mtime_ns + 1_000_000))
    assert proc.wait(15) == 0
    assert not path.exists()


def test_the_caller_goes_on_while_its_upload_job_is_made(crate: Path, server: Resident) -> None:
    from tests.client.test_uploads import UploadSink

    cache = UploadSink("slow-explain")
    env = {**environ(crate), "LARDER_URL": cache.url, "LARDER_TOKEN": "t", "LARDER_TIMEOUT": "20",
           "LARDER_LOG": str(crate / "log"), "CARGO_PKG_NAME": "t",
           "CARGO_PKG_VERSION": "0.1.0"}  # fmt: skip
    try:
        start = time.monotonic()
        done, _ = call(crate, [RUSTC, *LIB], env)  # returns at the end of its stdout/stderr
        returned = time.monotonic() - start
        assert done.returncode == 0, done.stderr
        assert (crate / "out" / "libt-x.rlib").is_file()
        assert returned < 3.5, returned  # not held by the explanation's 4 s
        assert not any(r.startswith("PUT") for r in cache.requests)  # the job is not made yet
        # What the child does now is the uploader's kind of work: at the uploader's priority.
        pid = server.proc.pid
        [child] = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        nice = int(Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[16])
        assert nice - os.nice(0) == uploads.DEFAULT_NICE

        waited = subprocess.run(
            [sys.executable, "-m", "larder.client.entry", "--wait-uploads", "60"],
            env=env, capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        assert waited.returncode == 0, waited.stderr
        assert "GET /main/rustc/inputs" in cache.requests  # the explanation was asked for
        assert "PUT /main/rustc/manifests/" in [r[:26] for r in cache.requests]
        assert "result=miss" in (crate / "log").read_text()  # logged before the wait ended
    finally:
        cache.close()


def _slow_writer_cache(crate: Path) -> tuple[UploadSink, dict[str, str]]:
    """A cache slow to explain a miss (so the upload job is made late), and the environment of
    a caller with a write token for it."""
    from tests.client.test_uploads import UploadSink

    cache = UploadSink("slow-explain")
    cache.delay = 2.0
    env = {**environ(crate), "LARDER_URL": cache.url, "LARDER_TOKEN": "t", "LARDER_TIMEOUT": "20",
           "LARDER_LOG": str(crate / "log"), "CARGO_PKG_NAME": "t",
           "CARGO_PKG_VERSION": "0.1.0"}  # fmt: skip
    return cache, env


@pytest.mark.parametrize("how", ["replaced", "rewritten"])
def test_an_output_the_next_build_wrote_after_the_caller_went_on_is_not_uploaded(
    crate: Path, server: Resident, how: str
) -> None:
    """The caller (cargo) goes on before the upload job is made; the next compilation of the
    crate (another env! value) writes the same file names meanwhile. Its bytes must never go
    under this compilation's key."""
    cache, env = _slow_writer_cache(crate)
    try:
        done, _ = call(crate, [RUSTC, *LIB], env)
        assert done.returncode == 0, done.stderr
        rlib = crate / "out" / "libt-x.rlib"
        if how == "replaced":  # a new file under the name, as rustc and linkers write
            rlib.unlink()
            rlib.write_bytes(b"the next build's rlib")
        else:  # the same file written again
            with rlib.open("r+b") as out:
                out.write(b"the next build's rlib")
        waited = subprocess.run(
            [sys.executable, "-m", "larder.client.entry", "--wait-uploads", "60"],
            env=env, capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        assert waited.returncode == 0, waited.stderr
        assert "GET /main/rustc/inputs" in cache.requests  # it went on past the explanation
        assert not any(r.startswith("PUT") for r in cache.requests), cache.requests
        assert "reason=changed-after-compiling" in (crate / "log").read_text()
    finally:
        cache.close()


def test_marks_of_jobs_in_preparation(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    assert not uploads.busy(spool)
    mark = uploads.hold(spool)
    assert mark is not None and uploads.busy(spool)
    assert not uploads.wait(spool, {}, 0.2)  # a job is still being made
    uploads.drop(mark)
    assert not uploads.busy(spool) and uploads.wait(spool, {}, 0.2)
    # A mark whose maker died is not waited for, and goes.
    code = "import sys; from pathlib import Path; from larder.client import uploads; "
    code += "uploads.hold(Path(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", code, str(spool)], check=True, timeout=60)
    assert [p.name[:6] for p in spool.iterdir()] == [".busy-"]
    assert not uploads.busy(spool)
    assert list(spool.iterdir()) == []


def test_a_miss_recorded_after_cargo_exited_keeps_its_build(crate: Path, server: Resident) -> None:
    from larder.client import explain
    from tests.client.test_uploads import UploadSink

    cache = UploadSink("slow-explain")
    cache.delay = 1.5
    env = {**environ(crate), "LARDER_URL": cache.url, "LARDER_TOKEN": "t", "LARDER_TIMEOUT": "20",
           "CARGO_PKG_NAME": "t", "CARGO_PKG_VERSION": "0.1.0"}  # fmt: skip
    try:
        # A shell stands for cargo: it is gone before the explanation is recorded.
        cargo = subprocess.run(
            ["sh", "-c", 'echo $$; "$@"', "sh", sys.executable, "-m", "larder.client.entry",
             RUSTC, *LIB],
            cwd=crate, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert cargo.returncode == 0, cargo.stderr
        done = subprocess.run(
            [sys.executable, "-m", "larder.client.entry", "explain", "--json"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr  # it waited for the record
    finally:
        cache.close()
    [record] = explain.load(crate / "state")
    assert record["crate"] == "t"
    assert record["build"].split("-")[0] == cargo.stdout.strip()
    assert not record["build"].endswith("-?")  # named while cargo still ran


def test_a_stopped_child_unwinds_so_half_written_files_go(tmp_path: Path) -> None:
    """The child a caller hung up on is stopped with SIGTERM (its process group); it unwinds
    instead of dying on the spot, so a download staged beside its output is removed."""
    staged = tmp_path / ".libt-x.rlib.larder-1"
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import signal, sys, time, larder.client.resident_server as r\n"
         "signal.signal(signal.SIGTERM, r._unwind)\n"
         f"open({str(staged)!r}, 'w').close()\n"
         "try:\n    print('ready', flush=True); time.sleep(60)\n"
         f"finally:\n    import os; os.unlink({str(staged)!r})\n"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert child.stdout is not None and child.stdout.readline() == "ready\n"
    assert staged.exists()
    child.send_signal(signal.SIGTERM)
    assert child.wait(10) == 128 + signal.SIGTERM
    child.stdout.close()
    assert not staged.exists()


def test_an_output_cargo_set_back_in_time_is_still_uploaded(crate: Path, server: Resident) -> None:
    """After ``cargo check`` cargo sets each output's modification time back to when the
    compilation started, often before the upload job is made: the file is the one rustc wrote,
    and must still be uploaded (it was refused as changed, so check builds were never cached)."""
    cache, env = _slow_writer_cache(crate)
    try:
        started = time.time() - 1
        done, _ = call(crate, [RUSTC, *LIB], env)
        assert done.returncode == 0, done.stderr
        for output in (crate / "out").iterdir():
            os.utime(output, (started, started))
        waited = subprocess.run(
            [sys.executable, "-m", "larder.client.entry", "--wait-uploads", "60"],
            env=env, capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        assert waited.returncode == 0, waited.stderr
        assert "PUT /main/rustc/manifests/" in [r[:26] for r in cache.requests], cache.requests
        assert "changed-after-compiling" not in (crate / "log").read_text()
    finally:
        cache.close()


def test_a_stopped_resident_process_never_holds_the_callers_output_open(
    crate: Path, server: Resident
) -> None:
    """A resident process that is stopped (SIGSTOP, a frozen cgroup) never accepts: the caller
    gives up after the handshake timeout and compiles by itself. Had it sent its descriptors
    already, they would stay in flight and cargo would never see the end of its output."""
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        done, _ = call(crate, [RUSTC, *LIB])  # capture_output: returns once stdout/err end
        elapsed = time.monotonic() - start
        assert done.returncode == 0, done.stderr
        assert (crate / "out" / "libt-x.rlib").exists()
        assert elapsed < resident.HANDSHAKE_TIMEOUT + 20
        # Its socket went with the first wait: the next call does not wait again.
        start = time.monotonic()
        again, _ = call(crate, [RUSTC, *LIB])
        assert again.returncode == 0, again.stderr
        assert time.monotonic() - start < resident.HANDSHAKE_TIMEOUT / 2
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


GIVE_UP_AFTER_TAKEN = """
import socket, sys, time
from larder.client import resident
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
assert sock.recv(1) == resident.HELLO
fds = [0, 1, 2, 7]
message = resident.encode_call(sys.argv[2:], fds, 1.0)
rights = b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in fds)
sent = sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
sock.sendall(message[sent:])
print(sock.recv(1).decode())
time.sleep(3)  # gave up, not yet gone
"""


def test_a_child_runs_its_call_only_once_the_caller_says_go(crate: Path, server: Resident) -> None:
    """A caller whose wait for ``TAKEN`` ran out (a loaded machine) compiles by itself; a
    ``TAKEN`` sent as it gave up had the child run the call too until the caller's hang-up
    reached it, which a hit can outrun (one replayed twice made cargo panic). The child now
    runs the call only on the caller's ``GO``: this caller gives up instead."""
    rustc = reporting_rustc(crate)
    read, write = os.pipe()
    try:
        done = subprocess.run(
            [sys.executable, "-c", GIVE_UP_AFTER_TAKEN, str(server.path), str(rustc), *LIB],
            cwd=crate,
            env=environ(crate),
            capture_output=True,
            text=True,
            timeout=60,
            close_fds=False,
            preexec_fn=lambda: os.dup2(write, REPORT_FD),
        )
    finally:
        os.close(write)
    assert done.returncode == 0 and done.stdout.strip() == "T", done
    with os.fdopen(read) as report:
        assert report.read() == ""  # every copy of the pipe closed, nothing written
    assert not (crate / "out" / "libt-x.rlib").exists()
