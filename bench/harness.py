"""Processes and measurements shared by the benchmarks in ``bench/``.

* :func:`larder_server`: ``larder serve`` as a subprocess on a free loopback port, with disk
  storage in a given directory, once ``/healthz`` answers; :meth:`LarderServer.token` mints a
  token with ``larder token create`` against the same storage.
* :class:`RssSampler`: the resident set size of a process, read from ``/proc/<pid>/status``
  every 20 ms in a thread, plus the kernel's own high-water mark (``VmHWM``, reset at the start
  through ``/proc/<pid>/clear_refs``) so a spike between two samples is not missed.
* :func:`nginx_server` (from ``tests/e2e/nginx.py``): Debian's nginx (installed with apt-get
  when missing) with a generated configuration, its pid file, logs and temporary directories
  all under one work directory.
* :func:`put_stream`, :func:`get_stream`, :func:`request`: one-connection HTTP/1.1 transfers with
  ``http.client``, streaming both ways, so the client never holds a body in memory.
* :func:`build_env` and :func:`compile_larder`: an environment without compiler wrappers or
  cache settings, and larder's bytecode compiled, for the benchmarks that run ``larder-rustc``.

Everything runs on loopback; nothing here listens on another interface.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import zstandard

from tests.e2e.nginx import nginx_server as nginx_server  # the benchmarks' peer

if TYPE_CHECKING:
    from typing_extensions import Buffer

MiB = 1024 * 1024
HOST = "127.0.0.1"
LARDER = (sys.executable, "-m", "larder")
READ_SIZE = 1 * MiB
HTTP_TIMEOUT = 600.0


# -- processes -------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL if the process is still there after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _clean_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    """The caller's environment without ``LARDER_*`` settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LARDER_")}
    env.update(extra or {})
    return env


def build_env() -> dict[str, str]:
    """The caller's environment without ``LARDER_*``, ``SCCACHE_*`` or ``RUSTC_WRAPPER``.

    ``PYTHONDONTWRITEBYTECODE`` goes too: installed code runs from compiled bytecode, and a
    shell that sets it would make every ``larder-rustc`` start compile its modules again.
    """
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    for name in list(env):
        if name.startswith(("LARDER_", "SCCACHE_")) or name == "RUSTC_WRAPPER":
            del env[name]
    return env


def compile_larder() -> None:
    """Compile larder's modules to bytecode, as an installed package has them."""
    root = Path(__file__).resolve().parents[1] / "larder"
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(root)], env=build_env(),
                   check=True, capture_output=True)  # fmt: skip


@dataclass
class LarderServer:
    """A running ``larder serve``."""

    proc: subprocess.Popen[bytes]
    port: int
    storage: Path
    log_path: Path
    env: dict[str, str]

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``larder ARGS --storage STORAGE``, checked, output captured."""
        return subprocess.run(
            [*LARDER, *args, "--storage", str(self.storage)],
            env=self.env,
            cwd=self.log_path.parent,  # as the server: PYTHONPATH decides which larder runs
            check=True,
            capture_output=True,
            text=True,
        )

    def token(self, cache: str = "main", scope: str = "write") -> str:
        """A new token for ``cache`` with ``scope``."""
        return self.cli("token", "create", "--cache", cache, "--scope", scope).stdout.strip()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def larder_server(
    storage: Path,
    workdir: Path,
    extra_env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> Iterator[LarderServer]:
    """``larder serve`` on a free port with disk storage in ``storage``; stopped on exit.

    ``LARDER_*`` variables of the caller are dropped so a developer's settings do not change a
    measurement; pass them in ``extra_env`` on purpose. The log goes to ``workdir``.
    """
    port = free_port()
    env = _clean_env(extra_env)
    log_path = workdir / f"larder-{port}.log"
    argv = [*LARDER, "serve", "--listen", f"{HOST}:{port}", "--storage", str(storage)]
    with log_path.open("wb") as log:
        # In workdir: `python -m` puts the working directory first on sys.path, so from a
        # checkout it would load that checkout's larder whatever PYTHONPATH names.
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    server = LarderServer(proc, port, storage, log_path, env)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"larder exited with {proc.returncode}:\n{server.log()}")
            try:
                if request("GET", f"{server.url}/healthz", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"larder did not answer /healthz in {timeout:.0f} s")
            time.sleep(0.05)
        yield server
    finally:
        stop_process(proc)


# -- memory ----------------------------------------------------------------------------------


def _status_kib(pid: int, keys: Sequence[str]) -> dict[str, int]:
    """Fields of ``/proc/<pid>/status`` given in kB, as KiB."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in keys:
                found[key] = int(value.split()[0])
    return found


def read_rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (``VmRSS``)."""
    return _status_kib(pid, ("VmRSS",)).get("VmRSS", 0) * 1024


def reset_peak_rss(pid: int) -> bool:
    """Reset the kernel's ``VmHWM`` of ``pid`` to its current RSS; ``False`` if not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")
    except OSError:
        return False
    return True


@dataclass
class RssSampler:
    """Baseline and peak RSS of a process while a ``with`` block runs.

    ``baseline`` is the RSS when the block starts; ``sampled_peak`` the largest of the samples
    taken every ``interval`` seconds (and one at the end); ``kernel_peak`` the kernel's ``VmHWM``
    at the end, after a reset at the start (``None`` where the reset is not allowed). ``peak``
    is the larger of the two.
    """

    pid: int
    interval: float = 0.02
    baseline: int = 0
    sampled_peak: int = 0
    kernel_peak: int | None = None
    end: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _hwm_reset: bool = field(default=False, repr=False)

    @property
    def peak(self) -> int:
        return max(self.sampled_peak, self.kernel_peak or 0)

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    def _sample(self) -> None:
        rss = read_rss(self.pid)
        self.samples += 1
        self.sampled_peak = max(self.sampled_peak, rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._sample()
            except OSError:
                return  # the process is gone

    def __enter__(self) -> RssSampler:
        self._hwm_reset = reset_peak_rss(self.pid)
        self.baseline = self.sampled_peak = read_rss(self.pid)
        self.samples = 1
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self._sample()
            status = _status_kib(self.pid, ("VmRSS", "VmHWM"))
        except OSError:
            return
        self.end = status.get("VmRSS", 0) * 1024
        if self._hwm_reset and "VmHWM" in status:
            self.kernel_peak = status["VmHWM"] * 1024

    def as_dict(self) -> dict[str, float | int | None]:
        """MiB figures of the last block, for reports."""
        return {
            "rss_baseline_mib": round(self.baseline / MiB, 1),
            "rss_peak_mib": round(self.peak / MiB, 1),
            "rss_growth_mib": round(self.growth / MiB, 1),
            "rss_end_mib": round(self.end / MiB, 1),
            "rss_sampled_peak_mib": round(self.sampled_peak / MiB, 1),
            "rss_kernel_peak_mib": (
                round(self.kernel_peak / MiB, 1) if self.kernel_peak is not None else None
            ),
            "rss_samples": self.samples,
        }


# -- HTTP ------------------------------------------------------------------------------------


def _connect(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise ValueError(f"only http:// URLs: {url}")
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    return conn, (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def request(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = HTTP_TIMEOUT,
) -> tuple[int, bytes]:
    """A small request on a new connection: ``(status, body)``."""
    conn, target = _connect(url, timeout)
    try:
        conn.request(method, target, body=body, headers=dict(headers or {}))
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@dataclass(frozen=True)
class Transfer:
    """One timed transfer. ``wire_bytes`` went over the connection as body bytes; ``sha256``
    is of the (decompressed) body for downloads."""

    status: int
    seconds: float
    wire_bytes: int
    body_bytes: int
    sha256: str
    reply: bytes = b""

    def mib_s(self, size: int | None = None) -> float:
        """Throughput in MiB/s of ``size`` bytes (default: the body) over the wall time."""
        return (self.body_bytes if size is None else size) / MiB / self.seconds


def put_stream(
    url: str,
    chunks: Iterable[Buffer],
    length: int,
    headers: Mapping[str, str] | None = None,
    timeout: float = HTTP_TIMEOUT,
) -> Transfer:
    """PUT ``chunks`` (``length`` bytes in all, sent with ``Content-Length``) on one connection,
    timed from the first byte sent to the end of the reply."""
    conn, target = _connect(url, timeout)
    sent = 0

    def counted() -> Iterator[Buffer]:
        nonlocal sent
        for chunk in chunks:
            sent += memoryview(chunk).nbytes
            yield chunk

    all_headers = {"Content-Length": str(length), **(headers or {})}
    try:
        start = time.perf_counter()
        conn.request("PUT", target, body=counted(), headers=all_headers)
        response = conn.getresponse()
        reply = response.read()
        seconds = time.perf_counter() - start
    finally:
        conn.close()
    if sent != length:
        raise ValueError(f"sent {sent} bytes, announced {length}")
    return Transfer(response.status, seconds, sent, sent, "", reply)


class _Sink:
    """Counts, optionally zstd-decompresses and sha256-hashes a body piece by piece."""

    def __init__(self, zstd: bool) -> None:
        self.digest = hashlib.sha256()
        self.decompressor = zstandard.ZstdDecompressor().decompressobj() if zstd else None
        self.wire = 0
        self.body = 0

    def feed(self, piece: memoryview) -> None:
        self.wire += len(piece)
        if self.decompressor is not None:
            data = self.decompressor.decompress(piece)
            self.body += len(data)
            self.digest.update(data)
        else:
            self.body += len(piece)
            self.digest.update(piece)

    def drain(self, readinto: Callable[[memoryview], int | None]) -> None:
        view = memoryview(bytearray(READ_SIZE))
        while count := readinto(view):
            self.feed(view[:count])

    def check_complete(self, what: str) -> None:
        if self.decompressor is not None and not self.decompressor.eof:
            raise ValueError(f"{what}: the zstd frame is truncated")


def get_stream(
    url: str,
    zstd: bool = False,
    headers: Mapping[str, str] | None = None,
    timeout: float = HTTP_TIMEOUT,
) -> Transfer:
    """GET a body on one connection in 1 MiB reads, decompressing zstd if asked, hashing the
    result with sha256; timed from the request to the last byte processed."""
    conn, target = _connect(url, timeout)
    sink = _Sink(zstd)
    try:
        start = time.perf_counter()
        conn.request("GET", target, headers=dict(headers or {}))
        response = conn.getresponse()
        if response.status != 200:
            reply = response.read()
            return Transfer(response.status, time.perf_counter() - start, len(reply), 0, "", reply)
        sink.drain(response.readinto)
        seconds = time.perf_counter() - start
    finally:
        conn.close()
    sink.check_complete(url)
    return Transfer(response.status, seconds, sink.wire, sink.body, sink.digest.hexdigest())


def read_file(path: Path, zstd: bool = False) -> Transfer:
    """What :func:`get_stream` does to a body, applied to a local file: the client's share of
    a download's work, without HTTP (from the page cache when the file was just written)."""
    sink = _Sink(zstd)
    start = time.perf_counter()
    with path.open("rb", buffering=0) as file:
        sink.drain(file.readinto)
    seconds = time.perf_counter() - start
    sink.check_complete(str(path))
    return Transfer(200, seconds, sink.wire, sink.body, sink.digest.hexdigest())


# -- reporting -------------------------------------------------------------------------------


def machine() -> dict[str, object]:
    """What a result depends on: CPUs, load, kernel, Python."""
    return {
        "cpus": os.cpu_count(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
    }
