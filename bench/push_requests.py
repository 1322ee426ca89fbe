"""Nix 2.8's upload sequence for a zstd chain, replayed against larder, timed per request.

For each of ``--paths`` store paths (a NAR of ``--size / paths`` bytes, half seeded random
bytes, half Rust-like text, compressed with zstd -3 beforehand): ``HEAD <hash>.narinfo`` (a
miss), ``PUT nar/<FileHash>.nar.zst``, ``PUT <hash>.narinfo`` naming the path before it, on
one keep-alive connection, as ``nix copy --to`` does. Prints the whole sequence's time and the
median of each kind of request, per round. Every round uploads NARs nobody stored before.

    .venv/bin/python bench/push_requests.py [--paths 24] [--size 200MiB] [--rounds 3]

Run it from another tree with ``PYTHONPATH=<tree>`` to compare two versions in one session.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import zstandard
from harness import larder_server
from push_pull_vs_file import closure_contents

from larder.protocol import nix32
from larder.protocol.nar import write_nar
from larder.service.config import parse_size


def one_round(url: str, token: str, files: list[tuple[bytes, bytes]]) -> dict[str, float]:
    tag = uuid.uuid4().hex
    uploads = []
    for i, (random_bytes, text) in enumerate(files):
        lib = {"libbench.rlib": random_bytes, "src.rs": text, "dep": f"{tag}-{i}".encode()}
        entries = {name: {"type": "regular", "contents": data} for name, data in lib.items()}
        lib_dir = {"type": "directory", "entries": entries}
        nar = write_nar({"type": "directory", "entries": {"lib": lib_dir}})
        uploads.append((nar, zstandard.ZstdCompressor(level=3).compress(nar)))
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port))
    auth = {"Authorization": f"Bearer {token}"}
    times: dict[str, list[float]] = {"head_narinfo": [], "put_nar": [], "put_narinfo": []}

    def call(kind: str, method: str, path: str, body: bytes | None = None) -> None:
        start = time.perf_counter()
        conn.request(method, path, body=body, headers=auth)
        response = conn.getresponse()
        response.read()
        times[kind].append(time.perf_counter() - start)
        if response.status != (404 if method == "HEAD" else 200):
            raise RuntimeError(f"{method} {path}: {response.status}")

    previous = ""
    start = time.perf_counter()
    for i, (nar, upload) in enumerate(uploads):
        store_hash = nix32.encode(hashlib.sha256(f"{tag}{i}".encode()).digest())[:32]
        file_hash = nix32.encode(hashlib.sha256(upload).digest())
        call("head_narinfo", "HEAD", f"/main/{store_hash}.narinfo")
        call("put_nar", "PUT", f"/main/nar/{file_hash}.nar.zst", upload)
        narinfo = (
            f"StorePath: /nix/store/{store_hash}-p{i}\nURL: nar/{file_hash}.nar.zst\n"
            f"Compression: zstd\nFileHash: sha256:{file_hash}\nFileSize: {len(upload)}\n"
            f"NarHash: sha256:{nix32.encode(hashlib.sha256(nar).digest())}\n"
            f"NarSize: {len(nar)}\nReferences: {previous}\n"
        )
        call("put_narinfo", "PUT", f"/main/{store_hash}.narinfo", narinfo.encode())
        previous = f"{store_hash}-p{i}"
    total = time.perf_counter() - start
    conn.close()
    return {"total": total, **{k: statistics.median(v) for k, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", type=int, default=24)
    parser.add_argument("--size", default="200MiB")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    files = closure_contents(args.paths, parse_size(args.size))
    with tempfile.TemporaryDirectory() as work, larder_server(Path(work) / "s", Path(work)) as srv:
        token = srv.token()
        for n in range(args.rounds):
            r = one_round(srv.url, token, files)
            print(
                f"round {n + 1}: sequence {r['total'] * 1000:.0f} ms; medians: HEAD narinfo "
                f"{r['head_narinfo'] * 1000:.1f} ms, PUT NAR {r['put_nar'] * 1000:.1f} ms, "
                f"PUT narinfo {r['put_narinfo'] * 1000:.1f} ms",
                flush=True,
            )


if __name__ == "__main__":
    main()
