"""Debian's nginx for the tests and benchmarks that put it beside or in front of larder: a
generated configuration, its pid file, logs and temporary directories all under one work
directory, on a free loopback port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.harness import free_port, stop

HOST = "127.0.0.1"


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Return once ``port`` accepts connections; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open in {timeout:.0f} s")


# -- nginx -----------------------------------------------------------------------------------


def ensure_nginx() -> str:
    """The nginx binary; installs Debian's ``nginx`` package with apt-get when it is missing."""
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if found:
        return found
    if os.geteuid() != 0:
        raise RuntimeError("nginx is not installed (run `apt-get install nginx` as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "nginx"]
    if subprocess.run(install, env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
        subprocess.run(install, env=env, check=True)
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.access(found, os.X_OK):
        raise RuntimeError("apt-get installed nginx but no nginx binary was found")
    return found


def nginx_version(binary: str) -> str:
    done = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
    return (done.stderr or done.stdout).strip().removeprefix("nginx version: ")


@dataclass
class NginxServer:
    """A running nginx."""

    proc: subprocess.Popen[bytes]
    port: int
    workdir: Path
    version: str

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def error_log(self) -> str:
        path = self.workdir / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""


def nginx_config(
    workdir: Path,
    port: int,
    server_body: str,
    workers: int = 1,
    connections: int = 256,
    http_extra: str = "",
) -> str:
    """An nginx.conf whose every path lies under ``workdir``; ``server_body`` goes inside
    ``server { listen 127.0.0.1:PORT; ... }``, ``http_extra`` before it in ``http``. As root,
    workers run as root so they can read and write wherever the caller's files are."""
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = "\n".join(
        f"  {kind}_temp_path {workdir / (kind + '_temp')};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""daemon off;
master_process on;
worker_processes {workers};
{user}pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} warn;
events {{ worker_connections {connections}; }}
http {{
  access_log off;
  default_type application/octet-stream;
  sendfile on;
  tcp_nopush on;
{temp}
{http_extra}
  server {{
    listen {HOST}:{port};
{server_body}
  }}
}}
"""


@contextmanager
def nginx_server(
    workdir: Path,
    server_body: str,
    workers: int = 1,
    connections: int = 256,
    http_extra: str = "",
) -> Iterator[NginxServer]:
    """nginx on a free loopback port with a generated config in ``workdir``; stopped on exit.
    ``connections``: nginx's ``worker_connections`` (per worker)."""
    binary = ensure_nginx()
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_config(workdir, port, server_body, workers, connections, http_extra))
    argv = [binary, "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(conf)]
    check = subprocess.run([*argv, "-t"], capture_output=True, text=True, check=False)
    if check.returncode != 0:
        raise RuntimeError(f"nginx rejected {conf}:\n{check.stderr}")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc)
        yield NginxServer(proc, port, workdir, nginx_version(binary))
    finally:
        stop(proc)
