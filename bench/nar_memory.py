"""Server memory and throughput for one large NAR through larder, with nginx measured alongside.

Goal under test: a 2 GiB NAR upload or download must not grow the server's RSS by more than
about 100 MiB.

A NAR holding one regular file of ``--size`` bytes is generated as a stream (never held in
memory): the file is a 64 MiB seeded pseudo-random pool repeated, so it is incompressible and
every pass yields the same bytes. A first pass hashes it (sha256 = FileHash = NarHash, since it
is uploaded uncompressed). Then, on loopback, each on one connection with the same client code:

1. larder: ``PUT /main/nar/<sha256>.nar`` (decompress, validate, hash, zstd, fsync), then its
   narinfo ``PUT`` and ``GET``;           nginx: WebDAV ``PUT`` of the same bytes;
2. larder: ``GET`` of the narinfo's ``URL`` (``.nar.zst``, the stored blob), decompressed and
   checked against NarHash;             nginx: the same blob file, served statically;
3. larder: ``GET nar/<NarHash>.nar`` (decompressed by the server) and checked;
   nginx: the file its WebDAV PUT stored, served statically.

During each larder phase a thread samples the server's RSS every 20 ms (and reads the kernel's
high-water mark, reset before the phase); growth = peak - RSS when the phase started. Exit status
1 when a phase grows by more than ``--limit`` MiB (default 100).

    .venv/bin/python bench/nar_memory.py [--size 2GiB] [--keep] [--json]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import (
    MiB,
    RssSampler,
    Transfer,
    get_stream,
    larder_server,
    machine,
    nginx_server,
    put_stream,
    read_file,
    read_rss,
    request,
)

from larder.protocol import nix32
from larder.protocol.nar import NAR_MAGIC, nar_string, write_nar
from larder.service.config import parse_size

POOL_SIZE = 64 * MiB
CHUNK = 1 * MiB
DEFAULT_SEED = 20261122
NAR_TYPE = "application/x-nix-nar"
PHASES = (
    ("upload", "upload .nar"),
    ("download_zstd", "GET .nar.zst"),
    ("download_plain", "GET .nar"),
)


# -- the NAR ---------------------------------------------------------------------------------


def nar_prefix(size: int) -> bytes:
    """Everything before the file's bytes: magic, ``( type regular contents`` and the length."""
    head = (NAR_MAGIC, b"(", b"type", b"regular", b"contents")
    return b"".join(nar_string(s) for s in head) + size.to_bytes(8, "little")


def nar_suffix(size: int) -> bytes:
    """Everything after the file's bytes: padding to 8 and ``)``."""
    return bytes(-size % 8) + nar_string(b")")


def nar_length(size: int) -> int:
    return len(nar_prefix(size)) + size + len(nar_suffix(size))


@dataclass(frozen=True)
class Payload:
    """A file of ``size`` bytes cycling through ``pool``, and the NAR holding it."""

    pool: bytes
    size: int

    def file_chunks(self) -> Iterator[memoryview]:
        """The file in slices of at most 1 MiB (views into the pool, no copies)."""
        view = memoryview(self.pool)
        sent = 0
        while sent < self.size:
            offset = sent % len(self.pool)
            piece = view[offset : offset + min(CHUNK, self.size - sent, len(self.pool) - offset)]
            sent += len(piece)
            yield piece

    def nar_chunks(self) -> Iterator[bytes | memoryview]:
        yield nar_prefix(self.size)
        yield from self.file_chunks()
        yield nar_suffix(self.size)

    @property
    def nar_size(self) -> int:
        return nar_length(self.size)

    def nar_sha256(self) -> bytes:
        digest = hashlib.sha256()
        for chunk in self.nar_chunks():
            digest.update(chunk)
        return digest.digest()


def check_stream_format(pool: bytes) -> None:
    """The streamed NAR equals :func:`write_nar`'s for small sizes (including padding cases)."""
    for size in (0, 1, 7, 8, 9, 1000, 4096 + 3):
        streamed = b"".join(bytes(c) for c in Payload(pool, size).nar_chunks())
        expected = write_nar({"type": "regular", "contents": pool[:size]})
        if streamed != expected:
            raise AssertionError(f"streamed NAR of a {size}-byte file differs from write_nar's")
        if len(streamed) != nar_length(size):
            raise AssertionError(f"nar_length({size}) is wrong")


# -- phases ----------------------------------------------------------------------------------


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def expect(transfer: Transfer, statuses: tuple[int, ...], what: str) -> Transfer:
    if transfer.status not in statuses:
        reply = transfer.reply[:500].decode(errors="replace")
        raise RuntimeError(f"{what}: HTTP {transfer.status}: {reply}")
    return transfer


def check_download(transfer: Transfer, nar_sha256: str, nar_size: int, what: str) -> None:
    expect(transfer, (200,), what)
    if transfer.sha256 != nar_sha256 or transfer.body_bytes != nar_size:
        raise RuntimeError(
            f"{what}: got {transfer.body_bytes} bytes with sha256 {transfer.sha256}, "
            f"expected {nar_size} bytes with {nar_sha256}"
        )


def timed(transfer: Transfer, nar_size: int) -> dict[str, Any]:
    return {
        "seconds": round(transfer.seconds, 3),
        "mib_s": round(transfer.mib_s(nar_size), 1),
        "wire_bytes": transfer.wire_bytes,
    }


def store_hash_for(size: int, seed: int) -> str:
    """A 32-character store path hash, fixed for a size and seed."""
    return nix32.encode(hashlib.sha256(f"bench-nar-{size}-{seed}".encode()).digest()[:20])


def narinfo_fields(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        fields[key] = value
    return fields


def log_problems(log: str) -> list[str]:
    """Lines of a server log that report a problem."""
    marks = ("Traceback", " ERROR ", " CRITICAL ", "Exception", "Error handling request")
    return [line for line in log.splitlines() if any(mark in line for mark in marks)]


def run(size: int, seed: int, limit_mib: float, keep: bool) -> dict[str, Any]:
    pool = random.Random(seed).randbytes(POOL_SIZE)
    check_stream_format(pool)
    payload = Payload(pool, size)
    nar_size = payload.nar_size
    results: dict[str, Any] = {
        "benchmark": "nar_memory",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "file_bytes": size,
        "nar_bytes": nar_size,
        "seed": seed,
        "limit_mib": limit_mib,
    }

    progress(f"hashing the {nar_size / MiB:.1f} MiB NAR (first pass)")
    start = time.perf_counter()
    nar_digest = payload.nar_sha256()
    results["client_hash_mib_s"] = round(nar_size / MiB / (time.perf_counter() - start), 1)
    nar_hex = nar_digest.hex()
    nar_hash = nix32.encode(nar_digest)  # also the FileHash: the upload is not compressed
    store_hash = store_hash_for(size, seed)

    work = Path(tempfile.mkdtemp(prefix="larder-bench-nar-"))
    results["workdir"] = str(work) if keep else None
    storage = work / "larder"
    nginx_dir = work / "nginx"
    nginx_body = f"""    location /blobs/ {{ alias {storage / "blobs"}/; }}
    location /put/ {{
      alias {nginx_dir / "put"}/;
      dav_methods PUT;
      create_full_put_path on;
      client_max_body_size 0;
      client_body_temp_path {nginx_dir / "put-tmp"};
    }}"""
    larder: dict[str, Any] = {}
    nginx: dict[str, Any] = {}
    results["larder"], results["nginx"] = larder, nginx
    try:
        with larder_server(storage, work) as server, nginx_server(nginx_dir, nginx_body) as peer:
            results["nginx_version"] = peer.version
            auth = {"Authorization": f"Bearer {server.token()}"}
            results["larder_rss_idle_mib"] = round(read_rss(server.pid) / MiB, 1)

            # 1. upload
            os.sync()
            progress("larder: PUT .nar")
            with RssSampler(server.pid) as memory:
                up = put_stream(
                    f"{server.url}/main/nar/{nar_hash}.nar",
                    payload.nar_chunks(),
                    nar_size,
                    {**auth, "Content-Type": NAR_TYPE},
                )
            expect(up, (200,), "larder PUT .nar")
            stored = json.loads(up.reply)
            if stored["nar_size"] != nar_size:
                raise RuntimeError(f"larder stored NarSize {stored['nar_size']}, sent {nar_size}")
            results["stored_bytes"] = stored["stored_size"]
            larder["upload"] = {**timed(up, nar_size), **memory.as_dict()}
            os.sync()
            progress("nginx: WebDAV PUT")
            peer_up = put_stream(f"{peer.url}/put/{nar_hash}.nar", payload.nar_chunks(), nar_size)
            nginx["upload"] = timed(expect(peer_up, (201, 204), "nginx PUT"), nar_size)
            os.sync()

            # the narinfo, then what the served one points at
            narinfo = (
                f"StorePath: /nix/store/{store_hash}-bench-nar\n"
                f"URL: nar/{nar_hash}.nar\n"
                "Compression: none\n"
                f"NarHash: sha256:{nar_hash}\n"
                f"NarSize: {nar_size}\n"
                "References: \n"
            )
            status, reply = request(
                "PUT",
                f"{server.url}/main/{store_hash}.narinfo",
                narinfo.encode(),
                {**auth, "Content-Type": "text/x-nix-narinfo"},
            )
            if status != 200:
                raise RuntimeError(f"larder PUT narinfo: HTTP {status}: {reply!r}")
            status, reply = request("GET", f"{server.url}/main/{store_hash}.narinfo")
            if status != 200:
                raise RuntimeError(f"larder GET narinfo: HTTP {status}: {reply!r}")
            served = narinfo_fields(reply.decode())
            results["served_narinfo"] = {
                k: served.get(k) for k in ("URL", "Compression", "FileSize", "NarHash", "NarSize")
            }
            if served.get("NarHash") != f"sha256:{nar_hash}" or served.get("NarSize") != str(
                nar_size
            ):
                raise RuntimeError(f"served narinfo does not match the upload:\n{reply.decode()}")
            record_path = storage / "objects" / "caches" / "main" / "nar" / nar_hash
            blob_id = json.loads(record_path.read_bytes())["blob"]
            blob_path = f"{blob_id[:2]}/{blob_id}"

            # 2. the served .nar.zst, and the same file from nginx
            zstd = served.get("Compression") == "zstd"
            progress(f"larder: GET {served['URL']}")
            with RssSampler(server.pid) as memory:
                down = get_stream(f"{server.url}/main/{served['URL']}", zstd=zstd)
            check_download(down, nar_hex, nar_size, f"larder GET {served['URL']}")
            larder["download_zstd"] = {**timed(down, nar_size), **memory.as_dict()}
            progress("nginx: GET the stored blob")
            peer_down = get_stream(f"{peer.url}/blobs/{blob_path}", zstd=zstd)
            check_download(peer_down, nar_hex, nar_size, "nginx GET blob")
            nginx["download_zstd"] = timed(peer_down, nar_size)

            # 3. the uncompressed .nar, and nginx's copy of the upload
            progress("larder: GET .nar")
            with RssSampler(server.pid) as memory:
                plain = get_stream(f"{server.url}/main/nar/{nar_hash}.nar")
            if plain.status == 404:
                larder["download_plain"] = None
            else:
                check_download(plain, nar_hex, nar_size, "larder GET .nar")
                larder["download_plain"] = {**timed(plain, nar_size), **memory.as_dict()}
            progress("nginx: GET its stored .nar")
            peer_plain = get_stream(f"{peer.url}/put/{nar_hash}.nar")
            check_download(peer_plain, nar_hex, nar_size, "nginx GET .nar")
            nginx["download_plain"] = timed(peer_plain, nar_size)

            # the client working alone: the same reads, decompression and hashing on local files
            alone = {
                "download_zstd": read_file(storage / "blobs" / blob_path, zstd=zstd),
                "download_plain": read_file(nginx_dir / "put" / f"{nar_hash}.nar"),
            }
            for phase, local in alone.items():
                check_download(local, nar_hex, nar_size, f"local read for {phase}")
            results["client_alone_mib_s"] = {
                phase: round(local.mib_s(nar_size), 1) for phase, local in alone.items()
            }

            results["larder_rss_end_mib"] = round(read_rss(server.pid) / MiB, 1)
            results["larder_log_problems"] = log_problems(server.log())
            results["nginx_error_log"] = [
                line for line in peer.error_log().splitlines() if "[warn]" not in line
            ]
    finally:
        if keep:
            progress(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["machine_after"] = machine()

    for phase, _ in PHASES:
        ours, theirs = larder.get(phase), nginx.get(phase)
        if ours is not None:
            ours["memory_pass"] = ours["rss_growth_mib"] <= limit_mib
        if ours is not None and theirs is not None:
            theirs["larder_throughput_ratio"] = round(ours["mib_s"] / theirs["mib_s"], 3)
    results["memory_pass"] = all(
        larder[phase]["memory_pass"] for phase, _ in PHASES if larder.get(phase) is not None
    )
    return results


# -- output ----------------------------------------------------------------------------------


def report(results: dict[str, Any]) -> str:
    m, after = results["machine"], results["machine_after"]
    limit = results["limit_mib"]
    alone = results["client_alone_mib_s"]
    lines = [
        f"larder NAR memory benchmark, {results['date']}",
        f"machine: {m['cpus']} CPUs, Linux {m['kernel']}, Python {m['python']}, "
        f"nginx {results['nginx_version']}; load average {m['loadavg']} before, "
        f"{after['loadavg']} after",
        f"NAR: one regular file of {results['file_bytes'] / MiB:.1f} MiB (pseudo-random, "
        f"seed {results['seed']}), NAR {results['nar_bytes'] / MiB:.1f} MiB, stored by larder "
        f"as {results['stored_bytes'] / MiB:.1f} MiB zstd",
        f"served narinfo: URL {results['served_narinfo']['URL']}, "
        f"Compression {results['served_narinfo']['Compression']}",
        f"client: sha256 of the generated NAR at {results['client_hash_mib_s']:.0f} MiB/s; "
        f"the same client work on local files (no HTTP): {alone['download_zstd']:.0f} MiB/s "
        f"for .nar.zst, {alone['download_plain']:.0f} MiB/s for .nar",
        f"larder RSS idle {results['larder_rss_idle_mib']:.1f} MiB, at the end "
        f"{results['larder_rss_end_mib']:.1f} MiB",
        "",
        f"{'phase':14} {'larder':>9} {'MiB/s':>7}  {'RSS base':>8} {'peak':>7} {'growth':>7} "
        f"{'goal':>4}  {'nginx':>8} {'MiB/s':>7}  {'larder/nginx':>12}",
    ]
    for phase, label in PHASES:
        ours, theirs = results["larder"].get(phase), results["nginx"].get(phase)
        if ours is None:
            lines.append(f"{label:14} not served by larder")
            continue
        verdict = "PASS" if ours["memory_pass"] else "FAIL"
        peer = (
            f"{theirs['seconds']:7.2f}s {theirs['mib_s']:7.1f}  "
            f"{theirs['larder_throughput_ratio']:12.2f}"
            if theirs
            else ""
        )
        lines.append(
            f"{label:14} {ours['seconds']:8.2f}s {ours['mib_s']:7.1f}  "
            f"{ours['rss_baseline_mib']:8.1f} {ours['rss_peak_mib']:7.1f} "
            f"{ours['rss_growth_mib']:+7.1f} {verdict:>4}  {peer}"
        )
    lines += [
        "",
        "RSS in MiB; growth = peak during the phase - RSS when it started (goal: at most "
        f"{limit:g} MiB); peak = max of 20 ms samples and the kernel's VmHWM.",
        "larder/nginx = larder's throughput / nginx's (1.00 = as fast; 0.50 = half as fast).",
        f"memory goal: {'PASS' if results['memory_pass'] else 'FAIL'}",
    ]
    problems = results["larder_log_problems"] + results["nginx_error_log"]
    if problems:
        lines += ["", "server log problems:", *problems[:20]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Server RSS and throughput for one large NAR, larder against nginx."
    )
    parser.add_argument("--size", default="2GiB", help="size of the file in the NAR (2GiB)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--json", action="store_true", help="print one JSON object of results")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=argparse.SUPPRESS)
    parser.add_argument(
        "--limit", type=float, default=100.0, help="allowed RSS growth per phase in MiB (100)"
    )
    options = parser.parse_args(argv)
    try:
        size = parse_size(options.size)
    except ValueError as exc:
        parser.error(str(exc))
    results = run(size, options.seed, options.limit, options.keep)
    print(json.dumps(results, indent=2) if options.json else report(results))
    return 0 if results["memory_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
