"""Memory and throughput of a large NAR through larder, with nginx on the same bytes as the peer.

A NAR of one regular file of ``--size`` bytes (default 2 GiB; seeded pseudo-random, so
incompressible) is generated as a stream, never held in memory, and:

1. uploaded uncompressed to ``PUT /main/nar/<sha256>.nar``, with its narinfo;
2. downloaded as served (``.nar.zst``, the stored bytes) and checked against its NarHash;
3. downloaded decompressed (``.nar``) and checked.

A sampler reads the server's RSS from ``/proc/<pid>/status`` every 20 ms; each phase reports the
growth of the peak over the RSS before it. Goal: under 100 MiB each. The peer is nginx (Debian's
package, installed when missing) on the same machine: it accepts the same upload with WebDAV PUT
and serves the stored zstd file statically; the script prints larder/nginx time ratios.

    .venv/bin/python bench/nar_memory.py [--size 2GiB] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import zstandard  # noqa: E402

from larder.protocol import nix32  # noqa: E402
from larder.protocol.nar import write_nar  # noqa: E402
from larder.service.config import parse_size  # noqa: E402
from tests.e2e.harness import free_port, larder_server  # noqa: E402

MiB = 1024 * 1024
POOL = random.Random(20261122).randbytes(64 * MiB)
PIECE = 1 * MiB
LIMIT_MIB = 100


def nar_string(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data + b"\0" * (-len(data) % 8)


def nar_stream(size: int) -> Iterator[bytes]:
    """A NAR holding one regular file of ``size`` pseudo-random bytes, in pieces."""
    header = (b"nix-archive-1", b"(", b"type", b"regular", b"contents")
    yield b"".join(nar_string(s) for s in header) + struct.pack("<Q", size)
    sent = 0
    while sent < size:
        offset = sent % len(POOL)
        piece = POOL[offset : offset + min(PIECE, size - sent)]
        sent += len(piece)
        yield piece
    yield b"\0" * (-size % 8) + nar_string(b")")


def nar_length(size: int) -> int:
    return sum(len(p) for p in nar_stream(0)) + size + (-size % 8)


class RssSampler:
    """Peak RSS of a process, sampled in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.02)

    def __enter__(self) -> RssSampler:
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def request(
    port: int, method: str, path: str, body: object = None, headers: dict[str, str] | None = None
) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request(method, path, body=body, headers=headers or {})  # type: ignore[arg-type]
    return conn.getresponse()


def download(port: int, path: str, zstd: bool) -> tuple[float, str]:
    """Stream a body, decompressing if asked; (seconds, sha256 hex of the NAR)."""
    start = time.monotonic()
    response = request(port, "GET", path)
    assert response.status == 200, (path, response.status)
    digest = hashlib.sha256()
    decompressor = zstandard.ZstdDecompressor().decompressobj() if zstd else None
    while chunk := response.read(PIECE):
        digest.update(decompressor.decompress(chunk) if decompressor else chunk)
    return time.monotonic() - start, digest.hexdigest()


def phase(sampler_pid: int, action: object) -> tuple[object, int, int]:
    with RssSampler(sampler_pid) as sampler:
        before = sampler.peak
        result = action() if callable(action) else None
    return result, before, sampler.peak


def nginx(work: Path, blob_dir: Path) -> tuple[subprocess.Popen[bytes], int]:
    if shutil.which("nginx") is None:
        subprocess.run(["apt-get", "install", "-y", "-q", "nginx-light"], check=True)
    port = free_port()
    (work / "nginx-put").mkdir()
    conf = work / "nginx.conf"
    conf.write_text(
        f"""daemon off; worker_processes 2; pid {work}/nginx.pid; error_log {work}/nginx.err;
user root;
events {{ worker_connections 256; }}
http {{
  access_log off; sendfile on; client_max_body_size 0;
  client_body_temp_path {work}/nginx-tmp;
  server {{
    listen 127.0.0.1:{port};
    location /put/ {{ alias {work}/nginx-put/; dav_methods PUT; create_full_put_path on; }}
    location /blobs/ {{ alias {blob_dir}/; }}
  }}
}}
"""
    )
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(work)])
    for _ in range(100):
        try:
            request(port, "GET", "/blobs/").read()
            break
        except OSError:
            time.sleep(0.05)
    return proc, port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="2GiB", help="size of the file in the NAR")
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    size = parse_size(options.size)
    assert write_nar({"type": "regular", "contents": POOL[:1000]}) == b"".join(nar_stream(1000))
    length = nar_length(size)
    nar_sha = hashlib.sha256()
    for piece in nar_stream(size):
        nar_sha.update(piece)
    file_hash = nix32.encode(nar_sha.digest())
    results: dict[str, object] = {"nar_bytes": length}
    with tempfile.TemporaryDirectory(prefix="larder-bench-") as tmp:
        work = Path(tmp)
        data = work / "data"
        with larder_server(str(data), work) as server:
            port = int(server.url.rsplit(":", 1)[1])
            headers = {"Authorization": f"Bearer {server.token()}", "Content-Length": str(length)}

            def upload() -> float:
                start = time.monotonic()
                response = request(port, "PUT", f"/main/nar/{file_hash}.nar", nar_stream(size),
                                   headers)  # fmt: skip
                body = response.read()
                assert response.status == 200, body
                return time.monotonic() - start

            seconds, before, peak = phase(server.pid, upload)
            results["upload"] = {"seconds": seconds, "rss_before": before, "rss_peak": peak}
            store_hash = nix32.encode(hashlib.sha256(b"bench").digest()[:20])
            narinfo = (
                f"StorePath: /nix/store/{store_hash}-bench-nar\nURL: nar/{file_hash}.nar\n"
                f"Compression: none\nNarHash: sha256:{file_hash}\nNarSize: {length}\n"
                "References: \n"
            ).encode()
            response = request(port, "PUT", f"/main/{store_hash}.narinfo", narinfo,
                               {"Authorization": headers["Authorization"]})  # fmt: skip
            assert response.status == 200, response.read()
            served = request(port, "GET", f"/main/{store_hash}.narinfo").read().decode()
            url = next(line[5:] for line in served.splitlines() if line.startswith("URL: "))
            nar_hash = nix32.encode(nar_sha.digest())
            for name, path, zstd in (
                ("download_zstd", f"/main/{url}", True),
                ("download_plain", f"/main/nar/{nar_hash}.nar", False),
            ):
                outcome, before, peak = phase(
                    server.pid, lambda p=path, z=zstd: download(port, p, z)
                )
                assert isinstance(outcome, tuple)
                assert outcome[1] == nar_sha.hexdigest(), name
                results[name] = {"seconds": outcome[0], "rss_before": before, "rss_peak": peak}
        blob_dir = next(p.parent for p in (data / "blobs").rglob("*") if p.is_file())
        blob = next(p for p in blob_dir.iterdir() if p.is_file())
        proc, nginx_port = nginx(work, blob_dir)
        try:
            start = time.monotonic()
            response = request(nginx_port, "PUT", "/put/nar", nar_stream(size),
                               {"Content-Length": str(length)})  # fmt: skip
            response.read()
            assert response.status in (201, 204), response.status
            results["nginx_upload_seconds"] = time.monotonic() - start
            seconds, digest = download(nginx_port, f"/blobs/{blob.name}", True)
            assert digest == nar_sha.hexdigest()
            results["nginx_download_zstd_seconds"] = seconds
        finally:
            proc.terminate()
            proc.wait()
    report(results, options.json)
    growth = [r["rss_peak"] - r["rss_before"] for k, r in results.items()  # type: ignore[index]
              if k in ("upload", "download_zstd", "download_plain")]  # fmt: skip
    return 0 if all(g < LIMIT_MIB * MiB for g in growth) else 1


def report(results: dict[str, object], as_json: bool) -> None:
    if as_json:
        print(json.dumps(results, indent=2))
        return
    length = results["nar_bytes"]
    assert isinstance(length, int)
    print(f"NAR of {length / MiB:.0f} MiB (incompressible), larder on disk storage, loopback")
    for name in ("upload", "download_zstd", "download_plain"):
        r = results[name]
        assert isinstance(r, dict)
        growth = (r["rss_peak"] - r["rss_before"]) / MiB
        verdict = "PASS" if growth < LIMIT_MIB else "FAIL"
        print(f"  {name:15s} {r['seconds']:7.2f} s  {length / MiB / r['seconds']:7.1f} MiB/s  "
              f"RSS {r['rss_before'] / MiB:6.1f} -> peak {r['rss_peak'] / MiB:6.1f} MiB "
              f"(+{growth:.1f}, goal < {LIMIT_MIB}: {verdict})")  # fmt: skip
    up, down = results["upload"], results["download_zstd"]
    assert isinstance(up, dict) and isinstance(down, dict)
    nginx_up, nginx_down = results["nginx_upload_seconds"], results["nginx_download_zstd_seconds"]
    assert isinstance(nginx_up, float) and isinstance(nginx_down, float)
    print(f"  nginx PUT       {nginx_up:7.2f} s   larder/nginx time {up['seconds'] / nginx_up:.2f}")
    print(f"  nginx GET .zst  {nginx_down:7.2f} s   larder/nginx time "
          f"{down['seconds'] / nginx_down:.2f}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
