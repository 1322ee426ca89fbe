"""Mixed traffic at many connections: does a real ``larder serve`` stay correct, fast and flat?

larder (disk storage in a temporary directory) is filled with ``--paths`` store paths (NARs of
1-60 KiB and their narinfos) through its HTTP API. Then ``--connections`` keep-alive
connections (an aiohttp client, one worker per connection) send, for ``--seconds``:

======================  ======  ======================================================
kind                    share   request (expected status)
======================  ======  ======================================================
``narinfo_hit``         55 %    ``GET <hash>.narinfo`` of a stored path (200)
``narinfo_miss``        25 %    ``GET <hash>.narinfo`` of a path nobody uploaded (404)
``nar``                 12 %    ``GET nar/<NarHash>.nar.zst`` of a stored NAR, body read (200)
``upload``               8 %    a new 16-64 KiB NAR: ``PUT nar/<hash>.nar`` then its narinfo
======================  ======  ======================================================

Every other status, and every connection error or timeout, counts as an unexpected error. The
server's RSS is read when the measured load starts (after ``--warmup`` seconds of the same
load) and every tenth of the run to its end (plus the kernel's peak); its open descriptors
half-way and its open-file limit are reported too. The peer, measured in the same run with the
same client, is nginx (2 workers, sendfile) serving copies of the same signed narinfos and
``.nar.zst`` files statically and taking uploads as WebDAV PUTs (no checks, no fsync)::

    .venv/bin/python bench/load_mixed.py [--seconds 60] [--connections 256] [--paths 500]
                                         [--no-peer] [--json]

Exit status 1 if larder answered anything unexpected or its RSS grew by more than
``--rss-limit`` MiB (default 64) between the start and the end of the load.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from harness import MiB, RssSampler, larder_server, machine, nginx_server, read_rss, request
from serve_vs_nginx import fill, store_hash

from larder.protocol import nix32
from larder.protocol.nar import write_nar

MIX = (("narinfo_hit", 55), ("narinfo_miss", 25), ("nar", 12), ("upload", 8))
KINDS = ("narinfo_hit", "narinfo_miss", "nar", "upload_nar", "upload_narinfo")
REQUEST_TIMEOUT = 60.0


@dataclass
class Target:
    """What one server is asked for, and which statuses are right."""

    url: str
    token: str
    hits: list[str]
    misses: list[str]
    nars: list[str]
    upload_ok: frozenset[int]


@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    unexpected: Counter[str] = field(default_factory=Counter)
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)

    def requests(self) -> int:
        return sum(len(v) for v in self.latencies.values()) + sum(
            n for what, n in self.unexpected.items() if what.startswith("error")
        )


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(pct / 100 * len(ordered)))]


def new_upload(rng: random.Random) -> tuple[str, bytes, str, bytes]:
    """A fresh NAR and its narinfo: (NAR path, NAR, narinfo path, narinfo)."""
    nar = write_nar({"type": "regular", "contents": rng.randbytes(rng.randint(16, 64) * 1024)})
    digest = nix32.encode(hashlib.sha256(nar).digest())
    hash_part = nix32.encode(hashlib.sha256(nar + b"path").digest()[:20])
    narinfo = (
        f"StorePath: /nix/store/{hash_part}-rust_load-0.1.0\nURL: nar/{digest}.nar\n"
        f"Compression: none\nNarHash: sha256:{digest}\nNarSize: {len(nar)}\nReferences: \n"
    ).encode()
    return f"/main/nar/{digest}.nar", nar, f"/main/{hash_part}.narinfo", narinfo


async def one(
    session: aiohttp.ClientSession,
    tally: Tally,
    kind: str,
    method: str,
    url: str,
    ok: frozenset[int],
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> bool:
    start = time.perf_counter()
    try:
        async with session.request(method, url, data=body, headers=headers) as response:
            await response.read()
            status = response.status
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        tally.unexpected[f"error {kind}: {type(exc).__name__}"] += 1
        return False
    tally.latencies[kind].append(time.perf_counter() - start)
    tally.statuses[(kind, status)] += 1
    if status not in ok:
        tally.unexpected[f"status {kind}: {status}"] += 1
        return False
    return True


async def worker(
    session: aiohttp.ClientSession, target: Target, tally: Tally, seed: int, deadline: float
) -> None:
    rng = random.Random(seed)
    kinds = [kind for kind, weight in MIX for _ in range(weight)]
    auth = {"Authorization": f"Bearer {target.token}"}
    base = target.url
    while time.monotonic() < deadline:
        kind = rng.choice(kinds)
        if kind == "narinfo_hit":
            path = f"/main/{rng.choice(target.hits)}.narinfo"
            await one(session, tally, kind, "GET", base + path, frozenset({200}))
        elif kind == "narinfo_miss":
            path = f"/main/{rng.choice(target.misses)}.narinfo"
            await one(session, tally, kind, "GET", base + path, frozenset({404}))
        elif kind == "nar":
            await one(session, tally, kind, "GET", base + rng.choice(target.nars), frozenset({200}))
        else:
            nar_path, nar, narinfo_path, narinfo = new_upload(rng)
            if await one(
                session, tally, "upload_nar", "PUT", base + nar_path, target.upload_ok, nar, auth
            ):
                await one(
                    session, tally, "upload_narinfo", "PUT", base + narinfo_path,
                    target.upload_ok, narinfo, auth,
                )  # fmt: skip


async def drive(
    target: Target, connections: int, seconds: float, pid: int | None
) -> dict[str, Any]:
    """Run the mix; sample the server's memory every tenth of the run, descriptors half-way."""
    tally = Tally()
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    memory: dict[str, Any] = {}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.monotonic()
        deadline = start + seconds
        tasks = [
            asyncio.create_task(worker(session, target, tally, n, deadline))
            for n in range(connections)
        ]
        if pid is not None:
            with RssSampler(pid, interval=0.25) as sampler:
                series = [round(read_rss(pid) / MiB, 1)]
                for tenth in range(1, 10):
                    await asyncio.sleep(max(start + seconds * tenth / 10 - time.monotonic(), 0))
                    series.append(round(read_rss(pid) / MiB, 1))
                    if tenth == 5:
                        memory["open_fds_middle"] = len(os.listdir(f"/proc/{pid}/fd"))
                await asyncio.gather(*tasks)
                series.append(round(read_rss(pid) / MiB, 1))
            memory["rss_series_mib"] = series
            memory["rss_start_mib"], memory["rss_middle_mib"] = series[0], series[5]
            memory["rss_end_mib"], memory["rss_peak_mib"] = series[-1], round(sampler.peak / MiB, 1)
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - start
    kinds = {
        kind: {
            "count": len(values),
            "p50_ms": round(percentile(values, 50) * 1000, 2),
            "p99_ms": round(percentile(values, 99) * 1000, 2),
        }
        for kind, values in tally.latencies.items()
    }
    total = tally.requests()
    return {
        "seconds": round(elapsed, 1),
        "requests": total,
        "requests_per_s": round(total / elapsed, 1),
        "unexpected": sum(tally.unexpected.values()),
        "unexpected_by_kind": dict(tally.unexpected.most_common(20)),
        "kinds": kinds,
        **memory,
    }


def open_file_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return f"{soft} (hard {hard})"
    return "?"


def prepare(url: str, token: str, paths: int, static: Path) -> Target:
    """Fill larder; copy what it serves (signed narinfos, .nar.zst files) for nginx."""
    hits, _ = fill(url, token, paths, MiB)
    nars = []
    (static / "main" / "nar").mkdir(parents=True)
    for hash_part in hits:
        status, body = request("GET", f"{url}/main/{hash_part}.narinfo")
        assert status == 200, status
        (static / "main" / f"{hash_part}.narinfo").write_bytes(body)
        nar_url = next(line[5:] for line in body.decode().splitlines() if line.startswith("URL: "))
        status, blob = request("GET", f"{url}/main/{nar_url}")
        assert status == 200, status
        (static / "main" / nar_url).write_bytes(blob)
        nars.append(f"/main/{nar_url}")
    misses = [store_hash(10**7 + n) for n in range(paths)]
    return Target(url, token, hits, misses, nars, frozenset({200}))


def report(results: dict[str, Any]) -> str:
    larder, peer = results["larder"], results.get("nginx")
    lines = [
        f"mixed load: {results['connections']} connections, {results['seconds']} s, "
        f"{results['paths']} stored paths; client: aiohttp, one process",
        f"machine: {results['machine']}",
        f"larder open-file limit {results['open_file_limit']}, "
        f"open descriptors half-way {larder.get('open_fds_middle')}",
        "",
        f"{'':16}{'larder':>30}" + (f"{'nginx':>30}{'ratio':>14}" if peer else ""),
        f"{'kind':16}{'count':>10}{'p50 ms':>10}{'p99 ms':>10}"
        + (f"{'count':>10}{'p50 ms':>10}{'p99 ms':>10}{'p50 l/n':>14}" if peer else ""),
    ]
    for kind in KINDS:
        ours = larder["kinds"][kind]
        row = f"{kind:16}{ours['count']:>10}{ours['p50_ms']:>10.2f}{ours['p99_ms']:>10.2f}"
        if peer:
            theirs = peer["kinds"][kind]
            ratio = ours["p50_ms"] / theirs["p50_ms"] if theirs["p50_ms"] else float("nan")
            row += f"{theirs['count']:>10}{theirs['p50_ms']:>10.2f}{theirs['p99_ms']:>10.2f}"
            row += f"{ratio:>14.1f}"
        lines.append(row)
    lines.append("")
    for name, side in (("larder", larder), ("nginx", peer)):
        if side is None:
            continue
        lines.append(
            f"{name}: {side['requests']} requests, {side['requests_per_s']:.0f} req/s, "
            f"{side['unexpected']} unexpected {side['unexpected_by_kind'] or ''}"
        )
    if peer:
        ratio = larder["requests_per_s"] / peer["requests_per_s"]
        lines.append(f"larder/nginx requests/s: {ratio:.2f}")
    lines.append(
        f"larder RSS MiB: start {larder['rss_start_mib']}, middle {larder['rss_middle_mib']}, "
        f"end {larder['rss_end_mib']}, peak {larder['rss_peak_mib']} "
        f"(growth start->end {larder['rss_end_mib'] - larder['rss_start_mib']:+.1f})"
    )
    lines.append(f"larder RSS MiB every tenth of the run: {larder['rss_series_mib']}")
    lines.append(f"result: {'PASS' if results['ok'] else 'FAIL'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--connections", type=int, default=256)
    parser.add_argument("--paths", type=int, default=500)
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load not measured")
    parser.add_argument("--rss-limit", type=float, default=64.0, help="MiB of growth allowed")
    parser.add_argument("--no-peer", action="store_true", help="skip the nginx run")
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args(argv)
    results: dict[str, Any] = {
        "connections": options.connections,
        "seconds": options.seconds,
        "paths": options.paths,
        "machine": machine(),
    }
    with tempfile.TemporaryDirectory(prefix="larder-bench-load-") as tmp:
        work = Path(tmp)
        static = work / "static"
        with larder_server(work / "data", work) as server:
            target = prepare(server.url, server.token(), options.paths, static)
            results["open_file_limit"] = open_file_limit(server.pid)
            asyncio.run(drive(target, options.connections, options.warmup, None))
            results["larder"] = asyncio.run(
                drive(target, options.connections, options.seconds, server.pid)
            )
            results["larder_log_errors"] = [
                line for line in server.log().splitlines() if " ERROR " in line
            ][:10]
        if not options.no_peer:
            body = (
                f"    root {static};\n    client_max_body_size 0;\n"
                f"    location / {{ dav_methods PUT; create_full_put_path on; }}\n"
            )
            room = options.connections + 64  # either worker may take every connection
            with nginx_server(work / "nginx", body, workers=2, connections=room) as nginx:
                peer = Target(
                    nginx.url, "", target.hits, target.misses, target.nars,
                    frozenset({201, 204}),
                )  # fmt: skip
                asyncio.run(drive(peer, options.connections, options.warmup, None))
                results["nginx"] = asyncio.run(
                    drive(peer, options.connections, options.seconds, None)
                )
    larder = results["larder"]
    growth = larder["rss_end_mib"] - larder["rss_start_mib"]
    results["ok"] = larder["unexpected"] == 0 and growth <= options.rss_limit
    print(json.dumps(results, indent=2) if options.json else report(results))
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
