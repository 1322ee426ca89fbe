"""Serving speed against nginx on the same bytes: narinfo requests/s and latency, NAR throughput.

larder (disk storage) is filled with ``--paths`` small store paths and one ``--nar-size`` NAR
through its HTTP API. The narinfos larder serves (signed) and the stored ``.nar.zst`` files are
then copied into a directory nginx serves statically with sendfile and 2 workers: the practical
ceiling for a Nix binary cache on one machine. wrk (Debian's package) drives both:

* narinfo GET, 64 connections, 10 s, paths cycling through every narinfo plus 10% misses;
* one (hot) narinfo GET, 64 connections;
* narinfo GET latency over one keep-alive connection (median and p99);
* NAR GET throughput (``.nar.zst``) over 1 and 4 connections.

    .venv/bin/python bench/serve_vs_nginx.py [--paths 500] [--nar-size 256MiB] [--seconds 10]
        [--rounds 3] [--larder-env LARDER_WORKERS=2 ...]

Goals: narinfo requests/s (many narinfos with misses, and one hot narinfo) and NAR
throughput >= 0.9x nginx's. The script prints the figures and the ratios (larder / nginx:
above 1 is better for req/s and MiB/s, below 1 for latencies): the median of each figure over
the rounds, and
the median of the rounds' ratios, each round's ratio beside it. Both servers run throughout and
take turns phase by phase, so a machine whose speed drifts (a shared virtual machine) moves
both alike; it does not judge noise beyond that.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import larder_server, nginx_server, request

from larder.protocol import nix32
from larder.protocol.nar import write_nar
from larder.service.config import parse_size

WRK_SCRIPT = """
local paths = {}
for line in io.lines("%s") do paths[#paths + 1] = line end
local i = 0
request = function()
  i = i %% #paths + 1
  return wrk.format("GET", paths[i])
end
"""


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found is None:
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=True, capture_output=True)
        found = shutil.which("wrk")
    assert found, "wrk is needed (Debian package wrk)"
    return found


def store_hash(n: int) -> str:
    return nix32.encode(hashlib.sha256(f"bench-{n}".encode()).digest()[:20])


def fill(url: str, token: str, paths: int, nar_size: int) -> tuple[list[str], str]:
    """Upload ``paths`` small NARs with narinfos and one big NAR; their hashes."""
    auth = {"Authorization": f"Bearer {token}"}
    hashes = []
    for n in range(paths):
        nar = write_nar({"type": "regular", "contents": os.urandom(1024 + (n * 37) % 60000)})
        hashes.append(_put(url, auth, store_hash(n), f"rust_bench{n}-0.1.0", nar))
    big = write_nar({"type": "regular", "contents": os.urandom(nar_size)})
    big_hash = _put(url, auth, store_hash(10**6), "rust_big-1.0.0", big)
    return hashes, big_hash


def _put(url: str, auth: dict[str, str], hash_part: str, name: str, nar: bytes) -> str:
    digest = nix32.encode(hashlib.sha256(nar).digest())
    status, body = request("PUT", f"{url}/main/nar/{digest}.nar", body=nar, headers=auth)
    assert status == 200, body
    narinfo = (
        f"StorePath: /nix/store/{hash_part}-{name}\nURL: nar/{digest}.nar\nCompression: none\n"
        f"NarHash: sha256:{digest}\nNarSize: {len(nar)}\nReferences: \n"
    )
    status, body = request("PUT", f"{url}/main/{hash_part}.narinfo", body=narinfo.encode(),
                           headers=auth)  # fmt: skip
    assert status == 200, body
    return hash_part


def mirror(url: str, hashes: list[str], big: str, out: Path, data: Path) -> str:
    """Copy what larder serves into ``out`` for nginx; the big NAR's path."""
    (out / "main" / "nar").mkdir(parents=True)
    big_url = ""
    for hash_part in [*hashes, big]:
        status, body = request("GET", f"{url}/main/{hash_part}.narinfo")
        assert status == 200
        (out / "main" / f"{hash_part}.narinfo").write_bytes(body)
        if hash_part == big:
            big_url = re.search(rb"^URL: (.*)$", body, re.M).group(1).decode()  # type: ignore[union-attr]
    status, _ = request("HEAD", f"{url}/main/{big_url}")
    assert status == 200
    # The stored blob is the served .nar.zst: link the newest blob file under its URL.
    blob = max(
        (p for p in (data / "blobs").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    shutil.copyfile(blob, out / "main" / big_url)
    return f"/main/{big_url}"


def wrk(
    binary: str, url: str, connections: int, seconds: int, script: Path | None
) -> dict[str, float]:
    argv = [binary, f"-t{min(connections, 2)}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if script is not None:
        argv += ["-s", str(script)]
    out = subprocess.run([*argv, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out)
    unit = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}
    bytes_s = float(transfer.group(1)) * unit.get(transfer.group(2), 1) if transfer else 0.0
    latency = {}
    for pct in ("50", "99"):
        match = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out)
        if match:
            scale = {"us": 1e-3, "ms": 1.0, "s": 1000.0}[match.group(2)]
            latency[pct] = float(match.group(1)) * scale
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "mib_s": bytes_s / 1024**2,
        "p50_ms": latency.get("50", 0.0),
        "p99_ms": latency.get("99", 0.0),
        "non_2xx": float(errors.group(1)) if errors else 0.0,
    }


PHASES = {  # phase -> (connections, what: "narinfos" (the script), "hot" (one narinfo), "nar")
    "narinfo_64": (64, "narinfos"),
    "hot_64": (64, "hot"),
    "narinfo_1": (1, "narinfos"),
    "nar_1": (1, "nar"),
    "nar_4": (4, "nar"),
}


def measure(
    binary: str, bases: dict[str, str], paths_file: Path, nar_path: str, hot_path: str,
    seconds: int, rounds: int, phases: list[str],
) -> dict[str, dict[str, list[dict[str, float]]]]:  # fmt: skip
    """Every phase ``rounds`` times against each server, the two taking turns (and turns about
    which goes first), so that a machine whose speed drifts slows both alike."""
    script = paths_file.with_suffix(".lua")
    script.write_text(WRK_SCRIPT % paths_file)
    runs: dict[str, dict[str, list[dict[str, float]]]] = {name: {} for name in bases}
    for n in range(rounds):
        for phase in phases:
            connections, what = PHASES[phase]
            order = list(bases) if n % 2 == 0 else list(reversed(bases))
            for name in order:
                url = bases[name] + {"narinfos": "", "hot": hot_path, "nar": nar_path}[what]
                narinfos = what == "narinfos"
                figures = wrk(binary, url, connections, seconds, script if narinfos else None)
                runs[name].setdefault(phase, []).append(figures)
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", type=int, default=500)
    parser.add_argument("--nar-size", default="256MiB")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--larder-env", nargs="*", default=[], help="KEY=VALUE for larder")
    parser.add_argument(
        "--phases", nargs="*", choices=list(PHASES), default=list(PHASES), help="default: all"
    )
    options = parser.parse_args()
    extra = dict(item.split("=", 1) for item in options.larder_env)
    binary = ensure_wrk()
    with tempfile.TemporaryDirectory(prefix="larder-bench-") as tmp:
        work = Path(tmp)
        with larder_server(work / "data", work, extra_env=extra) as server:
            hashes, big = fill(
                server.url, server.token(), options.paths, parse_size(options.nar_size)
            )
            static = work / "static"
            nar_path = mirror(server.url, hashes, big, static, work / "data")
            misses = [store_hash(10**7 + n) for n in range(len(hashes) // 10)]
            paths_file = work / "paths.txt"
            paths_file.write_text("".join(f"/main/{h}.narinfo\n" for h in [*hashes, *misses]))
            body = f"    root {static};\n    location / {{ }}\n"
            with nginx_server(work / "nginx", body, workers=2) as nginx:
                bases = {"larder": server.url, "nginx": nginx.url}
                hot_path = f"/main/{hashes[0]}.narinfo"
                runs = measure(binary, bases, paths_file, nar_path, hot_path, options.seconds,
                               options.rounds, options.phases)  # fmt: skip
    if options.json:
        print(json.dumps(runs, indent=2))
        return 0
    print(f"{options.paths} narinfos (+10% misses), one {options.nar_size} NAR; wrk on loopback, "
          f"{options.rounds} rounds of {options.seconds} s, medians; larder env {extra}; "
          f"load average {[round(x, 2) for x in os.getloadavg()]}")  # fmt: skip
    rows = (("narinfo_64", "rps", "narinfo GET, 64 conns, req/s"),
            ("hot_64", "rps", "one narinfo GET, 64 conns, req/s"),
            ("narinfo_1", "p50_ms", "narinfo GET, 1 conn, p50 ms"),
            ("narinfo_1", "p99_ms", "narinfo GET, 1 conn, p99 ms"),
            ("nar_1", "mib_s", "NAR GET .zst, 1 conn, MiB/s"),
            ("nar_4", "mib_s", "NAR GET .zst, 4 conns, MiB/s"))  # fmt: skip
    for phase, field, label in rows:
        if phase not in runs["larder"]:
            continue
        ours = [run[field] for run in runs["larder"][phase]]
        theirs = [run[field] for run in runs["nginx"][phase]]
        ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
        print(
            f"  {label:32s} larder {statistics.median(ours):10.3f}   "
            f"nginx {statistics.median(theirs):10.3f}   ratio {statistics.median(ratios):.2f}"
            f"  (rounds {' '.join(f'{r:.2f}' for r in ratios)})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
