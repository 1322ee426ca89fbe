"""larder against s3rver (npm), an S3 imitation that differs from S3 where larder relies on it:
it takes ``If-None-Match: *`` and overwrites anyway, keeps an object's date when it is copied
onto itself, and over HTTPS keeps the aws-chunked framing of checksummed uploads as the
object's bytes. ``make system-deps`` installs it (tools/install-s3rver.sh); a missing one fails.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from larder.storage.s3 import MIN_PART_SIZE, S3Storage
from tests.certificates import self_signed
from tests.e2e.harness import LARDER, free_port, http, larder_server, stop

S3RVER = Path(__file__).resolve().parents[2] / "build/s3rver/node_modules/.bin/s3rver"
#: s3rver's fixed credentials.
S3RVER_ENV = {
    "AWS_ACCESS_KEY_ID": "S3RVER",
    "AWS_SECRET_ACCESS_KEY": "S3RVER",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _start_s3rver(workdir: Path, tls: bool) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """s3rver with bucket ``bucket``; the environment that reaches it."""
    if not S3RVER.exists():
        pytest.fail(f"{S3RVER} is missing: run `make system-deps` (tools/install-s3rver.sh)")
    port = free_port()
    args = [str(S3RVER), "-d", str(workdir / "s3rver"), "-a", "127.0.0.1", "-p", str(port)]
    env = {**S3RVER_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    if tls:
        cert, key = self_signed(workdir, "127.0.0.1")
        args += ["--key", str(key), "--cert", str(cert)]
        env.update(AWS_ENDPOINT_URL=f"https://127.0.0.1:{port}", AWS_CA_BUNDLE=str(cert))
    (workdir / "s3rver").mkdir()
    # Node 17+ refuses the cipher s3rver's continuation tokens use without the legacy provider.
    node_env = {**os.environ, "NODE_OPTIONS": "--openssl-legacy-provider"}
    proc = subprocess.Popen(
        [*args, "--silent", "--configure-bucket", "bucket"],
        env=node_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"s3rver exited with {proc.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    else:
        stop(proc)
        raise TimeoutError("s3rver did not listen in 30 s")
    return proc, env


@pytest.fixture(params=[False, True], ids=["http", "https"])
def s3rver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    proc, env = _start_s3rver(tmp_path, tls=request.param)
    try:
        yield env
    finally:
        stop(proc)


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, **env}
    environ.pop("LARDER_CONFIG", None)
    environ.pop("AWS_REQUEST_CHECKSUM_CALCULATION", None)
    return subprocess.run(
        [*LARDER, *args, "--storage", "s3://bucket/cli"],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_serving_and_cache_create_on_s3rver(s3rver: dict[str, str], tmp_path: Path) -> None:
    """Objects are stored intact (over HTTPS too), and a second ``cache create`` of an existing
    cache is refused although the store ignores ``If-None-Match``."""
    env = {**s3rver, "LARDER_GC_INTERVAL": "0"}
    with larder_server("s3://bucket/serve", tmp_path, env) as server:
        status, body = http("GET", f"{server.url}/main/nix-cache-info")
        assert status == 200 and b"StoreDir: /nix/store" in body
        assert "ignores conditional writes" in server.log()
    first = _cli(s3rver, "cache", "create", "--private", "team")
    assert first.returncode == 0, first.stderr
    again = _cli(s3rver, "cache", "create", "team")
    assert again.returncode == 2 and "already exists" in again.stderr
    shown = json.loads(_cli(s3rver, "cache", "show", "team").stdout)
    assert shown["public_key"] == json.loads(first.stdout)["public_key"]
    assert shown["private"] is True


def test_a_store_keeping_the_chunk_framing_stops_the_start(tmp_path: Path) -> None:
    """Checksummed uploads forced over HTTPS: s3rver stores their aws-chunked framing, and
    ``larder serve`` says so at start instead of corrupting every object."""
    proc, env = _start_s3rver(tmp_path, tls=True)
    try:
        environ = {**os.environ, **env, "AWS_REQUEST_CHECKSUM_CALCULATION": "when_supported"}
        environ.pop("LARDER_CONFIG", None)
        listen = f"127.0.0.1:{free_port()}"
        done = subprocess.run(
            [*LARDER, "serve", "--listen", listen, "--storage", "s3://bucket/x"],
            env=environ,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2
        assert "the store returned other bytes than were written" in done.stderr
        assert "AWS_REQUEST_CHECKSUM_CALCULATION=when_required" in done.stderr
    finally:
        stop(proc)


async def test_a_large_blob_committed_again_on_s3rver_stays_fresh(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """s3rver keeps an object's date when it is copied onto itself: a blob committed again
    must still count as new for a collection that listed it before."""
    proc, env = _start_s3rver(tmp_path, tls=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_REQUEST_CHECKSUM_CALCULATION", raising=False)
    caplog.set_level(logging.WARNING)
    storage = S3Storage("bucket", "gc/", part_size=MIN_PART_SIZE, max_attempts=2)
    data = os.urandom(6 * 1024 * 1024)  # a multipart upload

    def commit() -> None:
        with storage.blob_writer() as writer:
            writer.write(data)
            writer.commit()

    try:
        await asyncio.to_thread(commit)
        [listed] = [blob async for blob in storage.blob_infos()]
        await asyncio.sleep(2.2)  # whole seconds, past the margin of a fresh blob
        await asyncio.to_thread(commit)
        assert not await storage.blob_delete_if_older(listed.blob_id, listed.modified + 1e-3)
        assert await storage.blob_stored_size(listed.blob_id) == listed.stored_size
        assert "does not date an object copied onto itself" in caplog.text
    finally:
        await storage.close()
        stop(proc)
