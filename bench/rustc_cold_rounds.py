"""Cold ``cargo build`` rounds: plain cargo, sccache, larder-rustc uploading, interleaved.

What a CI job pays for the cache. Each round builds the workspace of ``rustc_vs_sccache.py``
(``tests/rust-workspace`` plus ``--crates`` generated crates and ``genbin``) four times, cold,
each in a new directory with an empty target directory and an empty cache: plain cargo;
sccache 0.16 on a local disk cache; larder-rustc with a write token against a new ``larder
serve`` on loopback (every compilation a miss, every output uploaded), followed by the time until
its uploads are all sent (``--wait-uploads``); the same with ``LARDER_RESIDENT=0`` (every call
loads the shim itself: :mod:`larder.client.resident`). The order rotates between rounds so no
tool always follows the same one; the machine's load drifts, so ratios are taken within a round
and the median of the rounds is printed beside each round's own.

Besides wall time, each build's CPU is read from ``/proc/stat`` (every process on the machine,
idle and I/O wait excluded) and the server's from ``/proc/<pid>/stat``: with the server on
loopback, its receiving, hashing, compressing and fsyncing run on the build's cores, which a
remote server would not take.

    .venv/bin/python bench/rustc_cold_rounds.py [--crates 40] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from harness import build_env, compile_larder, free_port, larder_server
from rustc_vs_sccache import BIN, WORKSPACE, cargo_build, copy_workspace, generate, log_phases

TOOLS = ("plain", "sccache", "larder", "larder-in-process")


def machine_cpu() -> float:
    """CPU seconds spent by the whole machine (all states but idle and iowait)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid``."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_build(source: Path, where: Path, env: dict[str, str]) -> dict[str, float]:
    before = machine_cpu()
    seconds = cargo_build(copy_workspace(source, where / "app"), where / "t", env)
    return {"s": seconds, "cpu_s": machine_cpu() - before}


def plain(source: Path, where: Path) -> dict[str, float]:
    return timed_build(source, where, build_env())


def sccache(source: Path, where: Path) -> dict[str, float]:
    exe = str(BIN / "sccache")
    env = {**build_env(), "SCCACHE_DIR": str(where / "cache"),
           "SCCACHE_SERVER_PORT": str(free_port()), "RUSTC_WRAPPER": exe}  # fmt: skip
    subprocess.run([exe, "--start-server"], env=env, check=True, capture_output=True)
    try:
        return timed_build(source, where, env)
    finally:
        subprocess.run([exe, "--stop-server"], env=env, check=False, capture_output=True)


def larder(source: Path, where: Path, resident: bool = True) -> dict[str, float]:
    shim = str(BIN / "larder-rustc")
    where.mkdir(parents=True)
    with larder_server(where / "data", where) as server:
        env = {**build_env(), "RUSTC_WRAPPER": shim, "LARDER_URL": f"{server.url}/main",
               "LARDER_STATE_DIR": str(where / "state"), "LARDER_LOG": str(where / "log"),
               "LARDER_TOKEN": server.token(),
               "LARDER_RESIDENT": "1" if resident else "0"}  # fmt: skip
        server_before = process_cpu(server.proc.pid)
        result = timed_build(source, where, env)
        server_build = process_cpu(server.proc.pid) - server_before
        start, cpu_before = time.monotonic(), machine_cpu()
        subprocess.run([shim, "--wait-uploads", "600"], env=env, check=True, capture_output=True)
        result["uploads_done_s"] = result["s"] + time.monotonic() - start
        result["cpu_after_s"] = machine_cpu() - cpu_before
        result["server_cpu_s"] = server_build
        result["server_cpu_after_s"] = process_cpu(server.proc.pid) - server_before - server_build
    phases = log_phases(where / "log")
    result["shim_own_s"] = phases["total"] - phases.get("rustc", 0.0)
    result["shim_startup_s"] = phases.get("startup", 0.0)
    return result


BUILDERS: dict[str, Callable[[Path, Path], dict[str, float]]] = {
    "plain": plain,
    "sccache": sccache,
    "larder": larder,
    "larder-in-process": lambda source, where: larder(source, where, resident=False),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crates", type=int, default=40, help="generated path crates")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of cold builds")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    options = parser.parse_args()
    compile_larder()
    rounds: list[dict[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="larder-bench-") as tmp:
        work = Path(tmp)
        source = copy_workspace(WORKSPACE, work / "source")
        generate(source, options.crates)
        for number in range(options.rounds):
            order = TOOLS[number % len(TOOLS) :] + TOOLS[: number % len(TOOLS)]
            rounds.append(
                {tool: BUILDERS[tool](source, work / f"{tool}{number}") for tool in order}
            )
            if not options.json:
                print_round(number, order, rounds[-1])
    ratios = {
        "sccache": [r["sccache"]["s"] / r["plain"]["s"] for r in rounds],
        "larder": [r["larder"]["s"] / r["plain"]["s"] for r in rounds],
        "larder_uploads_done": [r["larder"]["uploads_done_s"] / r["plain"]["s"] for r in rounds],
        "larder_in_process": [r["larder-in-process"]["s"] / r["plain"]["s"] for r in rounds],
    }
    medians = {name: statistics.median(values) for name, values in ratios.items()}
    if options.json:
        print(json.dumps({"rounds": rounds, "ratios": ratios, "median_ratios": medians}, indent=2))
        return 0
    print(f"median over {options.rounds} rounds, cold / plain cargo in the same round: "
          f"sccache {medians['sccache']:.3f}, larder-rustc {medians['larder']:.3f} "
          f"(until its uploads are sent {medians['larder_uploads_done']:.3f}; without the "
          f"resident process {medians['larder_in_process']:.3f})")  # fmt: skip
    return 0


def print_round(number: int, order: tuple[str, ...], result: dict[str, dict[str, float]]) -> None:
    base, sc, la = result["plain"], result["sccache"], result["larder"]
    print(f"round {number + 1} ({', '.join(order)})")
    rows = (("plain cargo", base), ("sccache 0.16, local", sc), ("larder-rustc", la),
            ("  without resident", result["larder-in-process"]))  # fmt: skip
    for name, row in rows:
        print(
            f"  {name:20s} {row['s']:6.2f} s  {row['s'] / base['s']:.3f}x  CPU {row['cpu_s']:.1f} s"
        )
    print(
        f"  larder-rustc until its uploads are sent {la['uploads_done_s']:.2f} s "
        f"({la['uploads_done_s'] / base['s']:.3f}x, CPU {la['cpu_after_s']:.1f} s after the build)"
    )
    print(
        f"  larder-rustc CPU: server {la['server_cpu_s']:.1f} s during the build + "
        f"{la['server_cpu_after_s']:.1f} s after; shim beside rustc {la['shim_own_s']:.1f} s "
        f"and its start-up {la['shim_startup_s']:.1f} s, summed over compilations",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
