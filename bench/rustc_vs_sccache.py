"""Warm builds, same and another directory: larder-rustc against sccache's local disk cache.

Both caches are filled by a cold build of the same workspace in one directory ("CI"), then the
workspace is built again with an empty target directory, once in CI's directory and once from a
different directory ("a laptop"), which is where sccache's keys (they include absolute paths)
miss. Printed per tool: cold and warm wall time, compilations hit and compiled (missed or not
cacheable: sccache compiles binaries, proc-macros and build scripts every time), and the
ratios of the warm times. A plain ``cargo build`` without a wrapper, made right before each
tool's cold build, is the baseline of the cold ratios; larder-rustc's cold build also gets the
time until its uploads are sent (``--wait-uploads``), and the sum of its phases from
``LARDER_LOG`` (where a cold build's time goes in the shim).

The workspace is ``tests/rust-workspace`` (libraries, build scripts, a proc-macro on syn, a
crate linking a C library, a small binary) plus ``--crates`` generated path crates in layers
(each depending on two crates of the layer before) and a generated binary of some size
(``genbin``: its own generic code, a derive from the proc-macro, every crate of the last
layer), so there is real work to cache and to link.

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

from harness import build_env, compile_larder, free_port, larder_server

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


def binary_source(index: int, uses: list[str]) -> str:
    """``genbin``'s main.rs: three crates' worth of generic code, run, and every dependency."""
    items = "".join(RUST_ITEM.format(n=n, index=index) for n in range(45))
    runs = " + ".join(f"run{n}(3)" for n in range(45))
    deps = "".join(f'    println!("{{}}", {d}::run0(2));\n' for d in uses)
    return (
        "use describe::Describe;\nuse std::collections::BTreeMap;\n\n"
        "#[derive(Describe)]\n#[allow(dead_code)]\nstruct Totals { local: f64, crates: usize }"
        f'\n\n{items}\nfn main() {{\n    println!("{{}} {{}}", Totals::describe(), {runs});\n'
        f"{deps}}}\n"
    )


def generate(workspace: Path, crates: int) -> list[str]:
    """Add ``crates`` layered path crates and ``genbin`` to a copy of the test workspace;
    the generated crates' names."""
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
    last = names[-min(LAYER, len(names)) :] if names else []
    genbin = workspace / "crates" / "genbin"
    (genbin / "src").mkdir(parents=True)
    dep_lines = "".join(f'{d} = {{ path = "../{d}" }}\n' for d in last)
    (genbin / "Cargo.toml").write_text(
        '[package]\nname = "genbin"\nversion = "0.1.0"\nedition = "2021"\n\n'
        f'[dependencies]\ndescribe = {{ path = "../describe" }}\n{dep_lines}'
    )
    (genbin / "src" / "main.rs").write_text(binary_source(crates, last))
    manifest = workspace / "Cargo.toml"
    text = manifest.read_text()
    members = "".join(f'    "crates/{n}",\n' for n in [*names, "genbin"])
    assert '    "crates/demo",\n]' in text, "the workspace's member list changed shape"
    manifest.write_text(text.replace('    "crates/demo",\n]', f'    "crates/demo",\n{members}]'))
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


LINKED = {"describe": "proc-macro", "demo": "bin", "genbin": "bin"}


def kind_of(crate: str) -> str:
    return "build script" if crate == "build_script_build" else LINKED.get(crate, "library")


def log_kinds(log: Path) -> dict[str, dict[str, int]]:
    """Per kind of crate: compilations by result and their milliseconds, from LARDER_LOG."""
    kinds: dict[str, dict[str, int]] = {}
    for line in log.read_text().splitlines() if log.exists() else []:
        fields = dict(part.split("=", 1) for part in line.split()[1:])
        row = kinds.setdefault(kind_of(fields["crate"]), {"hit": 0, "miss": 0, "ms": 0})
        row[fields["result"]] = row.get(fields["result"], 0) + 1
        row["ms"] += int(fields["ms"])
    return kinds


def log_phases(log: Path) -> dict[str, float]:
    """Seconds per phase of the shim (``phases=`` in LARDER_LOG), summed over compilations."""
    total: dict[str, float] = {}
    for line in log.read_text().splitlines() if log.exists() else []:
        fields = dict(part.split("=", 1) for part in line.split()[1:])
        for item in fields.get("phases", "-").split(","):
            name, sep, ms = item.partition(":")
            if sep:
                total[name] = total.get(name, 0.0) + float(ms) / 1000
        total["total"] = total.get("total", 0.0) + int(fields["ms"]) / 1000
    return total


def measure(
    name: str,
    source: Path,
    work: Path,
    env_for: Callable[[str], dict[str, str]],
    stats: Callable[[], dict[str, object]],
    zero: Callable[[], None],
    repeat: int,
    settle: Callable[[], None] = lambda: None,
) -> dict[str, object]:
    """Cold build as CI, then warm builds in CI's directory and from laptops elsewhere.
    ``settle`` runs after the cold build (timed apart): until the uploads are sent."""
    ci, ci_target = work / f"{name}-ci" / "app", work / f"{name}-ci-t"
    cold = cargo_build(copy_workspace(source, ci), ci_target, env_for("ci"))
    start = time.monotonic()
    settle()
    settled = time.monotonic() - start
    same: list[float] = []
    other: list[float] = []
    same_stats: dict[str, object] = {}
    other_stats: dict[str, object] = {}
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
        "cold_uploads_done_s": cold + settled,
        "warm_same_dir_s": statistics.median(same),
        "warm_other_dir_s": statistics.median(other),
        "warm_same_dir_stats": same_stats,
        "warm_other_dir_stats": other_stats,
    }


def sccache(work: Path, source: Path, repeat: int) -> dict[str, object]:
    exe = str(BIN / "sccache")
    env = {
        **build_env(),
        "SCCACHE_DIR": str(work / "sccache-cache"),
        "SCCACHE_SERVER_PORT": str(free_port()),
        "SCCACHE_CACHE_SIZE": "10G",
        "RUSTC_WRAPPER": exe,
    }
    subprocess.run([exe, "--start-server"], env=env, check=True, capture_output=True)
    try:

        def stats() -> dict[str, object]:
            out = subprocess.run([exe, "--show-stats", "--stats-format", "json"], env=env,
                                 check=True, capture_output=True, text=True).stdout  # fmt: skip
            doc = json.loads(out)["stats"]
            hits = sum(doc["cache_hits"]["counts"].values())
            misses = sum(doc["cache_misses"]["counts"].values())
            # Not cached, minus cargo's probes (`rustc -vV`, `rustc - --print`): compilations
            # rustc ran anyway (reason "crate-type": binaries, proc-macros, build scripts).
            probes = ("-", "missing input")
            passed = sum(n for why, n in doc["not_cached"].items() if why not in probes)
            return {"hits": hits, "misses": misses, "non_cacheable": passed}

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
                **build_env(),
                "RUSTC_WRAPPER": exe,
                "LARDER_URL": f"{server.url}/main",
                "LARDER_STATE_DIR": str(work / f"larder-state-{machine}"),
                "LARDER_LOG": str(work / f"larder-log-{machine}"),
            }
            if machine == "ci":
                env["LARDER_TOKEN"] = token
            return env

        def stats() -> dict[str, object]:
            out = subprocess.run([exe, "--stats", "--json"], env=env_for("laptop"), check=True,
                                 capture_output=True, text=True).stdout  # fmt: skip
            doc = json.loads(out)
            return {"hits": doc["hits"], "misses": doc["misses"], "errors": doc["errors"],
                    "non_cacheable": doc["non_cacheable"],
                    "kinds": log_kinds(work / "larder-log-laptop")}  # fmt: skip

        def zero() -> None:
            subprocess.run([exe, "--zero-stats"], env=env_for("laptop"), check=True,
                           capture_output=True)  # fmt: skip
            (work / "larder-log-laptop").unlink(missing_ok=True)

        def settle() -> None:
            # check=False: a larder-rustc that uploads as it compiles has no such command.
            subprocess.run([exe, "--wait-uploads", "600"], env=env_for("ci"), check=False,
                           capture_output=True)  # fmt: skip

        result = measure("larder", source, work, env_for, stats, zero, repeat, settle)
        ci_log = work / "larder-log-ci"
        return {**result, "cold_kinds": log_kinds(ci_log), "cold_phases": log_phases(ci_log)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crates", type=int, default=40, help="generated path crates")
    parser.add_argument("--repeat", type=int, default=1, help="warm builds per tool (median)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    options = parser.parse_args()
    compile_larder()
    with tempfile.TemporaryDirectory(prefix="larder-bench-") as tmp:
        work = Path(tmp)
        source = copy_workspace(WORKSPACE, work / "source")
        generate(source, options.crates)
        # A plain build right before each tool's cold build: the load on a shared machine
        # drifts, so each cold ratio compares builds minutes apart, not a quarter hour.
        plains: list[float] = []

        def plain_build() -> float:
            where = work / f"plain{len(plains)}"
            plains.append(cargo_build(copy_workspace(source, where), where / "t", build_env()))
            return plains[-1]

        plain_build()
        sc_result = sccache(work, source, options.repeat)
        plain_build()
        results = {
            "crates_generated": options.crates,
            "plain_cargo_s": plains,
            "sccache": sc_result,
            "larder": larder(work, source, options.repeat),
        }
    plain = statistics.mean(plains)
    sc, la = results["sccache"], results["larder"]
    assert isinstance(sc, dict) and isinstance(la, dict)
    for ours, theirs in (("same_dir", "same_dir"), ("other_dir", "same_dir"),
                         ("other_dir", "other_dir")):  # fmt: skip
        results[f"ratio_larder_{ours}_over_sccache_{theirs}"] = (
            la[f"warm_{ours}_s"] / sc[f"warm_{theirs}_s"]
        )
    for tool, result, before in (("sccache", sc, plains[0]), ("larder", la, plains[1])):
        results[f"ratio_cold_{tool}_over_plain"] = result["cold_s"] / before
        results[f"ratio_cold_{tool}_uploads_done_over_plain"] = (
            result["cold_uploads_done_s"] / before
        )
    if options.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"workspace: tests/rust-workspace + {options.crates} generated crates + genbin, "
          f"{os.cpu_count()} cores")  # fmt: skip
    print(f"plain cargo build, no wrapper: {plain:6.2f} s (before sccache's cold build "
          f"{plains[0]:.2f} s, before larder-rustc's {plains[1]:.2f} s)")  # fmt: skip
    for name, tool in (("sccache", "sccache"), ("larder-rustc", "larder")):
        print(f"cold / the plain build before it: {name:13s} "
              f"{results[f'ratio_cold_{tool}_over_plain']:.2f}  (until its uploads are sent "
              f"{results[f'ratio_cold_{tool}_uploads_done_over_plain']:.2f})")  # fmt: skip
    print(f"{'':26s} {'cold':>8s} {'warm, same dir':>28s} {'warm, other dir':>28s}")
    for name, result in (("sccache 0.16 (local disk)", sc), ("larder-rustc (loopback)", la)):
        cells = []
        for where in ("same_dir", "other_dir"):
            counts = result[f"warm_{where}_stats"]
            assert isinstance(counts, dict)
            seconds = result[f"warm_{where}_s"]
            compiled = counts["misses"] + counts["non_cacheable"]
            cells.append(f"{seconds:6.2f} s {counts['hits']:3d} hit {compiled:3d} compiled")
        print(f"{name:26s} {result['cold_s']:6.2f} s {cells[0]:>28s} {cells[1]:>28s}")
    cold_kinds, warm = la["cold_kinds"], la["warm_other_dir_stats"]
    assert isinstance(cold_kinds, dict) and isinstance(warm, dict)
    print("larder-rustc by kind: compilations, time in the shim (cold: compile + upload; warm")
    print("from another dir: key + download), summed over compilations (cargo runs them -j2)")
    for kind, cold_row in sorted(cold_kinds.items()):
        warm_row = warm["kinds"].get(kind, {"hit": 0, "miss": 0, "ms": 0})
        print(f"  {kind:12s} cold {cold_row['miss']:3d} missed {cold_row['ms'] / 1000:7.2f} s"
              f"   warm {warm_row['hit']:3d} hit {warm_row['ms'] / 1000:6.2f} s")  # fmt: skip
    phases = la["cold_phases"]
    assert isinstance(phases, dict)
    print("larder-rustc cold, seconds per phase summed over compilations (startup: interpreter")
    print("and imports; rustc: the compilation cargo asked for; total: the shim's wall time):")
    print("  " + ", ".join(f"{name} {seconds:.2f}" for name, seconds in sorted(phases.items())))
    print(
        "larder / sccache, warm: same dir "
        f"{results['ratio_larder_same_dir_over_sccache_same_dir']:.2f}; larder from another "
        f"dir / sccache in its own {results['ratio_larder_other_dir_over_sccache_same_dir']:.2f}"
        f"; both from another dir {results['ratio_larder_other_dir_over_sccache_other_dir']:.2f}"
        " (below 1: larder faster)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
