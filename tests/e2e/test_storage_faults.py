"""Faults under a real ``larder serve``: the S3 endpoint dying mid-request and coming back, and
clients that disconnect mid-upload (disk and S3).

What a client sees when the S3 endpoint dies:

* a request that has not started its response (an upload, a lookup, ``/readyz``) gets 503 with
  ``Retry-After`` once boto3's retries give up;
* a download whose headers were already sent ends with the connection closed: the body is
  shorter than its ``Content-Length``, which Nix and curl treat as a failed transfer and retry;
* nothing half-written becomes visible, and larder answers again as soon as the endpoint is
  back, without a restart.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import time
from dataclasses import dataclass
from http.client import HTTPConnection, HTTPResponse, IncompleteRead
from pathlib import Path
from typing import Any

import pytest

from larder.protocol import nix32
from larder.protocol.nar import write_nar
from tests.e2e.harness import (
    S3_ENV,
    Larder,
    free_port,
    http,
    larder_server,
    moto_server,
    s3_client,
    start_moto,
    start_put,
    stop,
)
from tests.wait import wait_until

pytestmark = pytest.mark.s3
MiB = 1024 * 1024
BUCKET = "faults"


def nar_of(size: int) -> tuple[bytes, str]:
    """A NAR of one incompressible file, and its name for an uncompressed upload."""
    nar = write_nar({"type": "regular", "contents": os.urandom(size)})
    return nar, nix32.encode(hashlib.sha256(nar).digest())


@dataclass
class Upload:
    """A NAR PUT sent in two halves, with a pause between them."""

    conn: HTTPConnection

    @classmethod
    def start(cls, server: Larder, token: str, nar: bytes, file_hash: str, first: int) -> Upload:
        return cls(start_put(server.url, f"/main/nar/{file_hash}.nar", token, nar, first))

    def finish(self, rest: bytes) -> HTTPResponse:
        # The server may answer early and stop reading; its answer is still there.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.conn.send(rest)
        try:
            response = self.conn.getresponse()
            response.read()
        finally:
            self.conn.close()
        return response


def objects(endpoint: str) -> dict[str, bytes]:
    client = s3_client(endpoint)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    keys = [item["Key"] for page in pages for item in page.get("Contents", [])]
    return {key: client.get_object(Bucket=BUCKET, Key=key)["Body"].read() for key in keys}


def restore(endpoint: str, saved: dict[str, bytes]) -> None:
    client = s3_client(endpoint)
    client.create_bucket(Bucket=BUCKET)
    for key, body in saved.items():
        client.put_object(Bucket=BUCKET, Key=key, Body=body)


def timed(fn: Any, *args: Any) -> tuple[Any, float]:
    start = time.monotonic()
    result = fn(*args)
    return result, time.monotonic() - start


def test_s3_endpoint_dies_mid_request_and_comes_back(tmp_path: Path) -> None:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    moto = start_moto(port)
    try:
        s3_client(endpoint).create_bucket(Bucket=BUCKET)
        env = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint, "LARDER_REFRESH_INTERVAL": "1"}
        with larder_server(f"s3://{BUCKET}/x", tmp_path, env) as server:
            token = server.token()
            stored, stored_hash = nar_of(24 * MiB)
            status, _ = http("PUT", f"{server.url}/main/nar/{stored_hash}.nar", stored, token)
            assert status == 200
            saved = objects(endpoint)  # moto keeps its data in memory: this is what comes back

            # A download under way (headers and its first MiB received) ...
            host, larder_port = server.url.removeprefix("http://").split(":")
            download = HTTPConnection(host, int(larder_port), timeout=120)
            download.request("GET", f"/main/nar/{stored_hash}.nar")
            downloading = download.getresponse()
            assert downloading.status == 200
            first = downloading.read(MiB)
            # ... and an upload past its first multipart part (8 MiB) when the endpoint dies.
            nar, file_hash = nar_of(24 * MiB)
            upload = Upload.start(server, token, nar, file_hash, 12 * MiB)
            time.sleep(1.0)  # the server sends its first part to moto (not observable from here)
            moto.send_signal(signal.SIGKILL)
            moto.wait()

            response, upload_seconds = timed(upload.finish, nar[12 * MiB :])
            assert response.status == 503, response.status
            assert response.getheader("Retry-After", "").isdigit()
            try:
                rest: bytes | None = downloading.read()
            except (IncompleteRead, ConnectionError):
                rest = None  # the connection closed before Content-Length bytes arrived
            length = int(downloading.getheader("Content-Length", "0"))
            assert rest is None or len(first) + len(rest) < length
            download.close()
            (status, _), ready_seconds = timed(http, "GET", f"{server.url}/readyz")
            assert status == 503
            status, _ = http("GET", f"{server.url}/main/{'0' * 32}.narinfo")
            assert status == 503

            moto = start_moto(port)  # the endpoint is back, with the data it had
            restore(endpoint, saved)
            deadline = time.monotonic() + 30
            while http("GET", f"{server.url}/readyz")[0] != 200:
                assert time.monotonic() < deadline, "larder did not recover"
                time.sleep(0.2)
            assert http("GET", f"{server.url}/main/nar/{file_hash}.nar")[0] == 404
            again, again_hash = nar_of(MiB)
            status, _ = http("PUT", f"{server.url}/main/nar/{again_hash}.nar", again, token)
            assert status == 200
            assert http("GET", f"{server.url}/main/nar/{again_hash}.nar") == (200, again)
            client = s3_client(endpoint)
            leftovers = client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
            assert leftovers == []
        print(f"dead endpoint: upload 503 after {upload_seconds:.1f}s, readyz {ready_seconds:.1f}s")
    finally:
        stop(moto)


# -- clients that disconnect mid-upload ----------------------------------------------------


def _disconnect_mid_upload(server: Larder, size: int, sent: int, started: Any) -> str:
    """Send ``sent`` bytes of a ``size``-byte NAR upload, check ``started()`` (the server is
    streaming it into a temporary), then drop the connection with a reset."""
    nar, file_hash = nar_of(size - 200)
    upload = Upload.start(server, server.token(), nar, file_hash, sent)
    _eventually(started)
    sock = upload.conn.sock
    assert sock is not None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    upload.conn.close()  # linger 0: a reset, as when a client process dies
    return file_hash


def _eventually(check: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not cleaned up in time"
        time.sleep(0.1)


def test_disk_upload_cut_by_the_client_leaves_no_temporary(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with larder_server(str(data), tmp_path) as server:

        def temporaries() -> list[Path]:
            return [
                p
                for p in (data / "tmp").rglob("*")
                if p.is_file() and p.stat().st_size and p.name != "reserve"  # kept on purpose
            ]

        file_hash = _disconnect_mid_upload(server, 16 * MiB, 6 * MiB, temporaries)
        _eventually(lambda: not temporaries())
        # The temporary goes as the error unwinds; the request's line is written just after.
        _eventually(lambda: "refused (499)" in server.log_path.read_text())
        assert http("GET", f"{server.url}/main/nar/{file_hash}.nar")[0] == 404
        assert [p for p in (data / "blobs").rglob("*") if p.is_file()] == []
        assert not any((data / "objects" / "caches" / "main").rglob("nar/*"))
        # The client went away: not a server error in the metrics, the access log or the log.
        _, metrics = http("GET", f"{server.url}/metrics")
        server_errors = [
            float(line.rsplit(" ", 1)[1])
            for line in metrics.decode().splitlines()
            if line.startswith("larder_http_requests_total{") and 'status_class="5xx"' in line
        ]
        assert sum(server_errors) == 0, server_errors
        log = server.log_path.read_text()
        # (The access log's line may still be buffered; larder's own line is written at once.)
        assert "refused (499)" in log and '" 500 ' not in log and "Traceback" not in log


def test_s3_upload_cut_by_the_client_aborts_its_multipart_upload(tmp_path: Path) -> None:
    with moto_server() as endpoint:
        client = s3_client(endpoint)
        client.create_bucket(Bucket=BUCKET)
        env = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}
        with larder_server(f"s3://{BUCKET}/x", tmp_path, env) as server:

            def uploads() -> list[Any]:
                return list(client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []))

            file_hash = _disconnect_mid_upload(server, 24 * MiB, 12 * MiB, uploads)
            _eventually(lambda: not uploads())
            keys = list(objects(endpoint))
            assert [k for k in keys if k.startswith(("x/tmp/", "x/blobs/"))] == []
            assert [k for k in keys if "/nar/" in k] == []
            assert http("GET", f"{server.url}/main/nar/{file_hash}.nar")[0] == 404


def test_a_server_started_while_s3_is_down_serves_once_it_is_up(tmp_path: Path) -> None:
    """A replica started during an S3 outage does not exit: not ready, then ready, with cache
    ``main`` made by the start-up work it retried, and no tracebacks in its log."""
    port = free_port()
    env = {**S3_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    with larder_server(f"s3://{BUCKET}/late", tmp_path, env) as server:
        assert http("GET", f"{server.url}/readyz")[0] == 503
        moto = start_moto(port)
        try:
            s3_client(f"http://127.0.0.1:{port}").create_bucket(Bucket=BUCKET)
            wait_until(lambda: http("GET", f"{server.url}/main/nix-cache-info")[0] == 200, 90)
            assert http("GET", f"{server.url}/readyz")[0] == 200
        finally:
            stop(moto)
        log = server.log_path.read_text()
    assert "storage unreachable at start-up" in log
    assert "Traceback" not in log
