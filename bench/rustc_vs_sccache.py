"""Warm builds from another directory: larder-rustc against sccache's local disk cache.

Both caches are filled by a cold build of the same workspace in one directory ("CI"), then the
workspace is built again from a different directory with a different target directory ("a
laptop"), which is where sccache's keys (they include absolute paths) miss. Printed per tool:
cold and warm wall time, cacheable compilations hit on the warm build, and the ratio of the
warm times. A plain ``cargo build`` without a wrapper is the baseline.

The workspace is ``tests/rust-workspace`` plus ``--crates`` generated path crates in layers (each
depending on two crates of the layer before), so there is real work to cache.

    .venv/bin/python bench/rustc_vs_sccache.py [--crates 40] [--repeat 3] [--json]
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
from collections.abc import Callable
from pathlib import Path

from harness import free_port, larder_server

ROOT = Path(__file__).resolve().parents[1]

BIN = Path(sys.executable).parent
WORKSPACE = ROOT / "tests" / "rust-workspace"
LAYER = 8


RUST_ITEM = """\
pub trait Shape{n} {{ fn area(&self) -> f64; fn name(&self) -> String; }}
#[derive(Debug, Clone, PartialEq)] pub struct Item{n}<T> {{ pub v: T, pub k: u64 }}
impl<T: Clone + std::fmt::Debug> Shape{n} for Item{n}<T> {{
    fn area(&self) -> f64 {{ (self.k as f64) * {n}.5 }}
    fn name(&self) -> String {{ format!("{{:?}}-{index}-{n}", self.v) }}
}}
pub fn tally{n}<T: Clone + std::fmt::Debug>(items: &[Item{n}<T>]) -> BTreeMap<String, f64> {{
    items.iter().map(|i| (i.name(), i.area())).collect()
}}
pub fn run{n}(count: u64) -> f64 {{
    let a: Vec<Item{n}<String>> = (0..count).map(|k| Item{n} {{ v: k.to_string(), k }}).collect();
    let b: Vec<Item{n}<(u8, i64)>> =
        (0..count).map(|k| Item{n} {{ v: (k as u8, -(k as i64)), k }}).collect();
    tally{n}(&a).values().sum::<f64>() + tally{n}(&b).values().sum::<f64>()
}}
"""


def crate_source(index: int) -> str:
    """A crate whose generic code is instantiated, so compiling it takes a moment (~0.7 s)."""
    items = "".join(RUST_ITEM.format(n=n, index=index) for n in range(15))
    return f"// Generated crate {index}.\nuse std::collections::BTreeMap;\n\n{items}"


def generate(workspace: Path, crates: int) -> list[str]:
    """Add ``crates`` layered path crates to a copy of the test workspace; their names."""
    names = [f"gen{i:03d}" for i in range(crates)]
    for i, name in enumerate(names):
        layer = i // LAYER
        deps = []
        if layer:
            base = (layer - 1) * LAYER
            deps = [names[base + (i % LAYER)], names[base + ((i + 3) % LAYER)]]
        crate = workspace / "crates" / name
        (crate / "src").mkdir(parents=True)
        dep_lines = "".join(f'{d} = {{ path = "../{d}" }}\n' for d in deps)
        (crate / "Cargo.toml").write_text(
            f'[package]\nname = "{name}"\nversion = "0.1.0"\nedition = "2021"\n\n'
            f'[dependencies]\nleaf = {{ path = "../leaf" }}\n{dep_lines}'
        )
        uses = "".join(f"pub use {d};\n" for d in deps)
        (crate / "src" / "lib.rs").write_text(uses + crate_source(i))
    manifest = workspace / "Cargo.toml"
    text = manifest.read_text()
    members = ", ".join(f'"crates/{n}"' for n in names)
    manifest.write_text(text.replace('"crates/demo"]', f'"crates/demo", {members}]'))
    return names


def copy_workspace(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns("target"))
    return destination


def cargo_build(workspace: Path, target: Path, env: dict[str, str]) -> float:
    start = time.monotonic()
    subprocess.run(
        ["cargo", "build", "--offline", "--workspace"],
        cwd=workspace,
        env={**env, "CARGO_TARGET_DIR": str(target), "CARGO_INCREMENTAL": "0"},
        check=True,
        capture_output=True,
    )
    return time.monotonic() - start


def base_env() -> dict[str, str]:
    # Installed packages run from compiled bytecode; a shell that sets PYTHONDONTWRITEBYTECODE
    # would make every larder-rustc start recompile its modules.
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    for name in list(env):
        if name.startswith(("LARDER_", "SCCACHE_")) or name == "RUSTC_WRAPPER":
            del env[name]
    return env


def measure(
    name: str,
    source: Path,
    work: Path,
    env_for: Callable[[str], dict[str, str]],
    stats: Callable[[], dict[str, int]],
    zero: Callable[[], None],
    repeat: int,
) -> dict[str, object]:
    """Cold build as CI, then warm builds in CI's directory and from laptops elsewhere."""
    ci, ci_target = work / f"{name}-ci" / "app", work / f"{name}-ci-t"
    cold = cargo_build(copy_workspace(source, ci), ci_target, env_for("ci"))
    same: list[float] = []
    other: list[float] = []
    same_stats: dict[str, int] = {}
    other_stats: dict[str, int] = {}
    for attempt in range(repeat):
        shutil.rmtree(ci_target)
        zero()
        same.append(cargo_build(ci, ci_target, env_for("laptop")))
        same_stats = stats()
        zero()
        laptop = copy_workspace(source, work / f"{name}-laptop{attempt}" / "src" / "app")
        other.append(cargo_build(laptop, work / f"{name}-laptop{attempt}-t", env_for("laptop")))
        other_stats = stats()
    return {
        "cold_s": cold,
        "warm_same_dir_s": statistics.median(same),
        "warm_other_dir_s": statistics.median(other),
        "warm_same_dir_stats": same_stats,
        "warm_other_dir_stats": other_stats,
    }


def sccache(work: Path, source: Path, repeat: int) -> dict[str, object]:
    exe = str(BIN / "sccache")
    env = {
        **base_env(),
        "SCCACHE_DIR": str(work / "sccache-cache"),
        "SCCACHE_SERVER_PORT": str(free_port()),
        "SCCACHE_CACHE_SIZE": "10G",
        "RUSTC_WRAPPER": exe,
    }
    subprocess.run([exe, "--start-server"], env=env, check=True, capture_output=True)
    try:

        def stats() -> dict[str, int]:
            out = subprocess.run([exe, "--show-stats", "--stats-format", "json"], env=env,
                                 check=True, capture_output=True, text=True).stdout  # fmt: skip
            doc = json.loads(out)["stats"]
            hits = sum(doc["cache_hits"]["counts"].values())
            misses = sum(doc["cache_misses"]["counts"].values())
            return {"hits": hits, "misses": misses}

        def zero() -> None:
            subprocess.run([exe, "--zero-stats"], env=env, check=True, capture_output=True)

        return measure("sccache", source, work, lambda _: env, stats, zero, repeat)
    finally:
        subprocess.run([exe, "--stop-server"], env=env, check=False, capture_output=True)


def larder(work: Path, source: Path, repeat: int) -> dict[str, object]:
    exe = str(BIN / "larder-rustc")
    with larder_server(work / "larder-data", work) as server:
        token = server.token()

        def env_for(machine: str) -> dict[str, str]:
            env = {
                **base_env(),
                "RUSTC_WRAPPER": exe,
                "LARDER_URL": f"{server.url}/main",
                "LARDER_STATE_DIR": str(work / f"larder-state-{machine}"),
            }
            if machine == "ci":
                env["LARDER_TOKEN"] = token
            return env

        def stats() -> dict[str, int]:
            out = subprocess.run([exe, "--stats", "--json"], env=env_for("laptop"), check=True,
                                 capture_output=True, text=True).stdout  # fmt: skip
            doc = json.loads(out)
            return {"hits": doc["hits"], "misses": doc["misses"], "errors": doc["errors"]}

        def zero() -> None:
            subprocess.run([exe, "--zero-stats"], env=env_for("laptop"), check=True,
                           capture_output=True)  # fmt: skip

        return measure("larder", source, work, env_for, stats, zero, repeat)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crates", type=int, default=40, help="generated path crates")
    parser.add_argument("--repeat", type=int, default=1, help="warm builds per tool (median)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    options = parser.parse_args()
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(ROOT / "larder")],
        env=base_env(), check=True, capture_output=True,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="larder-bench-") as tmp:
        work = Path(tmp)
        source = copy_workspace(WORKSPACE, work / "source")
        generate(source, options.crates)
        plain = cargo_build(copy_workspace(source, work / "plain"), work / "plain-t", base_env())
        results = {
            "crates_generated": options.crates,
            "plain_cargo_s": plain,
            "sccache": sccache(work, source, options.repeat),
            "larder": larder(work, source, options.repeat),
        }
    sc, la = results["sccache"], results["larder"]
    assert isinstance(sc, dict) and isinstance(la, dict)
    results["ratio_larder_other_dir_over_sccache_same_dir"] = (
        la["warm_other_dir_s"] / sc["warm_same_dir_s"]
    )
    results["ratio_larder_other_dir_over_sccache_other_dir"] = (
        la["warm_other_dir_s"] / sc["warm_other_dir_s"]
    )
    if options.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"workspace: tests/rust-workspace + {options.crates} generated crates, 2 cores")
    print(f"plain cargo build, no wrapper: {plain:6.2f} s")
    print(f"{'':26s} {'cold':>8s} {'warm, same dir':>22s} {'warm, other dir':>22s}")
    for name, result in (("sccache 0.16 (local disk)", sc), ("larder-rustc (loopback)", la)):
        cells = []
        for where in ("same_dir", "other_dir"):
            hits = result[f"warm_{where}_stats"]
            assert isinstance(hits, dict)
            seconds = result[f"warm_{where}_s"]
            cells.append(
                f"{seconds:6.2f} s {hits['hits']:3d}/{hits['hits'] + hits['misses']:d} hit"
            )
        print(f"{name:26s} {result['cold_s']:6.2f} s {cells[0]:>22s} {cells[1]:>22s}")
    print(
        "larder from another dir / sccache in its own dir: "
        f"{results['ratio_larder_other_dir_over_sccache_same_dir']:.2f}; "
        "/ sccache from another dir: "
        f"{results['ratio_larder_other_dir_over_sccache_other_dir']:.2f} (below 1: larder faster)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
