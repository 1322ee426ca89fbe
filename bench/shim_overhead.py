"""What larder-rustc costs per call: passthrough probes, and a hit for a small crate.

* Passthrough: cargo asks rustc ``-vV`` and ``- --print=...`` through the wrapper; the shim
  ``exec``s rustc after importing nothing but ``os`` and ``sys``. Measured as the median wall
  time of ``larder-rustc rustc ARGS`` against ``rustc ARGS``, ``--runs`` times each,
  interleaved.
* Hit: a one-function library and a hello-world binary are compiled once with a write token
  (the cache fills), then compiled from another directory with the output removed before each
  run, so every run is a hit (key, lookup, download, restore). Median wall time against plain
  ``rustc`` compiling the same crate.

    .venv/bin/python bench/shim_overhead.py [--runs 30] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import build_env, compile_larder, larder_server

SHIM = str(Path(sys.executable).parent / "larder-rustc")


def _toolchain_rustc() -> str:
    """The toolchain's rustc, as cargo runs it (not a rustup proxy)."""
    proxy = shutil.which("rustc") or "rustc"
    sysroot = subprocess.run([proxy, "--print", "sysroot"], capture_output=True, text=True)
    candidate = Path(sysroot.stdout.strip(), "bin", "rustc")
    return str(candidate) if sysroot.returncode == 0 and candidate.is_file() else proxy


RUSTC = _toolchain_rustc()
CRATES = {
    "lib": ("src/lib.rs", "pub fn answer() -> u32 { 42 }\n", ["--crate-type", "lib",
            "--emit=dep-info,metadata,link"]),
    "bin": ("src/main.rs", 'fn main() { println!("hello"); }\n', ["--crate-type", "bin",
            "--emit=dep-info,link"]),
}  # fmt: skip


def wall(command: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def passthrough(runs: int) -> dict[str, dict[str, float]]:
    env = {**build_env(), "LARDER_URL": "http://127.0.0.1:9/main"}  # never contacted
    probes = {"-vV": ["-vV"], "--print": ["-", "--crate-name", "___", "--print=sysroot",
              "--print=cfg", "--crate-type", "lib"]}  # fmt: skip
    found: dict[str, dict[str, float]] = {}
    for name, args in probes.items():
        plain: list[float] = []
        shim: list[float] = []
        for _ in range(runs):
            plain.append(wall([RUSTC, *args], env=env))
            shim.append(wall([SHIM, RUSTC, *args], env=env))
        found[name] = {
            "rustc_ms": 1000 * statistics.median(plain),
            "shim_ms": 1000 * statistics.median(shim),
        }
        found[name]["overhead_ms"] = found[name]["shim_ms"] - found[name]["rustc_ms"]
    return found


def crate(base: Path, kind: str) -> tuple[Path, list[str]]:
    source, text, kind_args = CRATES[kind]
    (base / source).parent.mkdir(parents=True)
    (base / source).write_text(text)
    (base / "out").mkdir()
    argv = ["--crate-name", f"small_{kind}", "--edition=2021", source, *kind_args,
            "-C", "extra-filename=-b", "--out-dir", "out"]  # fmt: skip
    return base, argv


def hits(work: Path, runs: int) -> dict[str, dict[str, float]]:
    found: dict[str, dict[str, float]] = {}
    with larder_server(work / "data", work) as server:
        env = {**build_env(), "LARDER_URL": f"{server.url}/main"}
        for kind in CRATES:
            ci, argv = crate(work / kind / "ci", kind)
            ci_env = {**env, "LARDER_TOKEN": server.token(), "LARDER_STATE_DIR": str(ci / "st")}
            subprocess.run([SHIM, RUSTC, *argv], cwd=ci, env=ci_env, check=True)
            # The upload leaves after the call returns: the laptop's first call must find it.
            subprocess.run([SHIM, "--wait-uploads", "120"], cwd=ci, env=ci_env, check=True)
            laptop, _ = crate(work / kind / "laptop" / "elsewhere", kind)
            laptop_env = {**env, "LARDER_STATE_DIR": str(laptop / "st")}
            plain_dir, _ = crate(work / kind / "plain", kind)
            wall([SHIM, RUSTC, *argv], laptop, laptop_env)  # toolchain facts, once per user
            plain: list[float] = []
            shim: list[float] = []
            for _ in range(runs):
                for out in (laptop / "out", plain_dir / "out"):
                    shutil.rmtree(out)
                    out.mkdir()
                shim.append(wall([SHIM, RUSTC, *argv], laptop, laptop_env))
                plain.append(wall([RUSTC, *argv], plain_dir, env))
            stats = json.loads(subprocess.run(
                [SHIM, "--stats", "--json"], env=laptop_env, check=True, capture_output=True,
                text=True,
            ).stdout)  # fmt: skip
            if stats["hits"] != runs + 1 or stats["misses"] or stats["errors"]:
                raise RuntimeError(f"{kind}: expected only hits, got {stats}")
            found[kind] = {
                "hit_ms": 1000 * statistics.median(shim),
                "rustc_ms": 1000 * statistics.median(plain),
            }
            found[kind]["ratio"] = found[kind]["hit_ms"] / found[kind]["rustc_ms"]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="runs per measurement (median)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    options = parser.parse_args()
    compile_larder()
    with tempfile.TemporaryDirectory(prefix="larder-bench-") as tmp:
        results = {
            "passthrough": passthrough(options.runs),
            "hit": hits(Path(tmp), options.runs),
        }
    if options.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"larder-rustc per-call cost, median of {options.runs} runs, {os.cpu_count()} cores")
    for name, row in results["passthrough"].items():
        print(f"passthrough {name:8s} rustc {row['rustc_ms']:6.1f} ms  through the shim "
              f"{row['shim_ms']:6.1f} ms  overhead {row['overhead_ms']:+5.1f} ms")  # fmt: skip
    for name, row in results["hit"].items():
        print(f"hit, small {name:4s}   rustc compiling it {row['rustc_ms']:6.1f} ms  shim hit "
              f"{row['hit_ms']:6.1f} ms  hit/rustc {row['ratio']:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
