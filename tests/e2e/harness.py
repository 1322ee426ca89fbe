"""Real processes for end-to-end tests: a `larder serve`, a moto S3 server, the Nix client."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

LARDER = [sys.executable, "-m", "larder"]
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer in {timeout}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def http(method: str, url: str, body: bytes = b"", token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body if method == "PUT" else None, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def start_moto(port: int) -> subprocess.Popen[bytes]:
    """A moto S3 server process on ``port``, once it answers."""
    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/moto-api/", proc)
    except BaseException:
        stop(proc)
        raise
    return proc


@contextmanager
def moto_server() -> Iterator[str]:
    """A moto S3 server over real HTTP; yields its endpoint URL."""
    port = free_port()
    proc = start_moto(port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def s3_client(endpoint: str) -> Any:
    """A plain boto3 S3 client for the moto server at ``endpoint``."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def make_bucket(endpoint: str, bucket: str) -> None:
    s3_client(endpoint).create_bucket(Bucket=bucket)


def start_put(url: str, path: str, token: str, body: bytes, first: int) -> HTTPConnection:
    """Begin ``PUT path`` of ``body`` with ``Content-Length`` and send only ``first`` bytes."""
    host, port = url.removeprefix("http://").split(":")
    conn = HTTPConnection(host, int(port), timeout=120)
    conn.putrequest("PUT", path)
    conn.putheader("Authorization", f"Bearer {token}")
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders()
    conn.send(body[:first])
    return conn


@dataclass
class Larder:
    """A running `larder serve` process."""

    url: str
    storage: str
    env: dict[str, str]
    log_path: Path
    pid: int

    def run_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*LARDER, *args, "--storage", self.storage],
            env=self.env,
            check=True,
            capture_output=True,
            text=True,
        )

    def cli(self, *args: str) -> str:
        return self.run_cli(*args).stdout.strip()

    def token(self, cache: str = "main", scope: str = "write") -> str:
        return self.token_with_id(cache, scope)[0]

    def token_with_id(self, cache: str = "main", scope: str = "write") -> tuple[str, str]:
        """A new token and its id (``larder token create`` reports the id on stderr)."""
        done = self.run_cli("token", "create", "--cache", cache, "--scope", scope)
        token_id = done.stderr.split("token id ", 1)[1].split(",", 1)[0]
        return done.stdout.strip(), token_id

    def cache_info(self, cache: str = "main") -> dict[str, object]:
        with urllib.request.urlopen(f"{self.url}/api/v1/caches/{cache}") as resp:
            return dict(json.load(resp))

    def log(self) -> str:
        return self.log_path.read_text()

    def settled_log(self, timeout: float = 5.0) -> str:
        """The log once it has stopped growing: access log lines are written in batches every
        50 ms, so two reads 0.1 s apart that agree hold every line of requests answered."""
        last = self.log()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.1)
            now = self.log()
            if now == last:
                break
            last = now
        return last


@contextmanager
def larder_server(
    storage: str,
    workdir: Path,
    extra_env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
) -> Iterator[Larder]:
    port = free_port()
    env = {**os.environ, **(extra_env or {})}
    env.pop("LARDER_CONFIG", None)
    log_path = workdir / f"larder-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*LARDER, "serve", "--listen", f"127.0.0.1:{port}", "--storage", storage, *extra_args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for_http(url + "/healthz", proc)
            yield Larder(url, storage, env, log_path, proc.pid)
        finally:
            stop(proc)
