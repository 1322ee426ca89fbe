"""Run the fuzz targets: a bounded pass (CI) or a long one, with a summary per target.

::

    .venv/bin/python -m fuzz.run                    # every target, 60 s each
    .venv/bin/python -m fuzz.run --seconds 600 nar  # one target, ten minutes
    .venv/bin/python -m fuzz.run --runs 3000        # a bounded pass (what `make test` runs)
    .venv/bin/python -m fuzz.run --write-seeds      # rebuild fuzz/corpus/ from the fixtures

Each target runs in its own process (libFuzzer exits when it is done) from the committed seeds
in ``fuzz/corpus/<target>/`` plus a working corpus that collects what it discovers (a temporary
directory unless ``--corpus-dir`` keeps it). Printed per target: executions, edges and features
covered (libFuzzer's ``cov`` and ``ft`` over larder's instrumented code), corpus size, peak RSS,
and any crash, hang (``-timeout``, 10 s per input) or memory blow-up (``-rss_limit_mb``) with
the file that reproduces it (``python -m fuzz.<target> FILE``). Exit status 1 if any target
failed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"
FIXTURES = ROOT / "tests" / "fixtures" / "nix"
TARGETS = (
    "narinfo", "nar", "tokens", "request_paths", "request_heads", "client_args", "client_depinfo",
    "rustc_inputs",
)  # fmt: skip
MAX_LEN = {"nar": 65536}
DEFAULT_MAX_LEN = 8192
INPUT_TIMEOUT = 10
RSS_LIMIT_MB = 2048

_STAT = re.compile(r"^stat::(\w+):\s+(\d+)", re.MULTILINE)
_PROGRESS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/", re.MULTILINE)
_ARTIFACT = re.compile(r"Test unit written to (\S+)")


@dataclass
class Result:
    """One target's pass."""

    target: str
    returncode: int
    seconds: float
    executions: int
    coverage: int
    features: int
    corpus: int
    peak_rss_mb: int
    artifacts: list[str]
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.artifacts

    def problem(self) -> str:
        """The part of libFuzzer's output that explains a failure."""
        lines = self.output.splitlines()
        start = next(
            (i for i, line in enumerate(lines) if "Uncaught Python exception" in line
             or "ERROR: libFuzzer" in line or "ALARM" in line),
            max(len(lines) - 40, 0),
        )  # fmt: skip
        return "\n".join(lines[start : start + 60])


def run_target(
    target: str,
    *,
    seconds: float,
    runs: int | None = None,
    corpus_dir: Path | None = None,
    artifact_dir: Path | None = None,
) -> Result:
    """Fuzz ``target`` for ``seconds`` (or ``runs`` executions, whichever ends first)."""
    if target not in TARGETS:
        raise ValueError(f"unknown fuzz target {target!r}; targets: {', '.join(TARGETS)}")
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{target}-") as scratch:
        work = corpus_dir or Path(scratch) / "corpus"
        artifacts = artifact_dir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        artifacts.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable, "-m", f"fuzz.{target}",
            f"-max_total_time={max(int(seconds), 1)}",
            f"-timeout={INPUT_TIMEOUT}",
            f"-rss_limit_mb={RSS_LIMIT_MB}",
            f"-max_len={MAX_LEN.get(target, DEFAULT_MAX_LEN)}",
            f"-artifact_prefix={artifacts}/",
            "-print_final_stats=1",
            str(work),
            str(CORPUS / target),
        ]  # fmt: skip
        if runs is not None:
            argv.insert(4, f"-runs={runs}")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        start = time.monotonic()
        done = subprocess.run(
            argv, cwd=ROOT, env=env, capture_output=True, text=True, errors="replace",
            timeout=seconds + 120, check=False,
        )  # fmt: skip
        elapsed = time.monotonic() - start
        output = done.stdout + done.stderr
        stats = {name: int(value) for name, value in _STAT.findall(output)}
        progress = _PROGRESS.findall(output)
        last = progress[-1] if progress else ("0", "0", "0", "0")
        found = _ARTIFACT.findall(output)
        if artifact_dir is None and found:  # keep the reproducer past the temporary directory
            keep = Path(tempfile.mkdtemp(prefix=f"fuzz-{target}-crash-"))
            found = [str(_copy(Path(path), keep)) for path in found]
        return Result(
            target=target,
            returncode=done.returncode,
            seconds=elapsed,
            executions=stats.get("number_of_executed_units", int(last[0])),
            coverage=int(last[1]),
            features=int(last[2]),
            corpus=int(last[3]),
            peak_rss_mb=stats.get("peak_rss_mb", 0),
            artifacts=found,
            output=output,
        )


def _copy(path: Path, directory: Path) -> Path:
    target = directory / path.name
    target.write_bytes(path.read_bytes())
    return target


# -- seeds -------------------------------------------------------------------------------------


def write_seeds() -> dict[str, int]:
    """Rebuild ``fuzz/corpus/`` from the Nix fixtures and a few hand-written inputs."""
    from fuzz import seeds

    counts = {}
    for target, files in seeds.all_seeds(FIXTURES).items():
        directory = CORPUS / target
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.iterdir():
            old.unlink()
        for name, data in files.items():
            (directory / name).write_bytes(data)
        counts[target] = len(files)
    return counts


# -- command line ------------------------------------------------------------------------------


def _report(results: list[Result]) -> str:
    rows = [
        f"{'target':<16}{'result':>8}{'execs':>10}{'execs/s':>9}{'cov':>7}{'ft':>7}{'corpus':>8}"
        f"{'rss MiB':>9}{'time':>8}"
    ]
    for r in results:
        rate = r.executions / r.seconds if r.seconds else 0.0
        rows.append(
            f"{r.target:<16}{'ok' if r.ok else 'FAIL':>8}{r.executions:>10}{rate:>9.0f}"
            f"{r.coverage:>7}{r.features:>7}{r.corpus:>8}{r.peak_rss_mb:>9}{r.seconds:>7.1f}s"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__.split("\n")[0])
    parser.add_argument("targets", nargs="*", help=f"default: all ({', '.join(TARGETS)})")
    parser.add_argument("--seconds", type=float, default=60.0, help="per target (default 60)")
    parser.add_argument("--runs", type=int, help="stop a target after this many executions")
    parser.add_argument("--corpus-dir", type=Path, help="keep each working corpus under DIR")
    parser.add_argument("--write-seeds", action="store_true", help="rebuild fuzz/corpus/")
    args = parser.parse_args(argv)
    if args.write_seeds:
        for target, count in write_seeds().items():
            print(f"{target}: {count} seeds")
        return 0
    results = []
    for target in args.targets or TARGETS:
        corpus = args.corpus_dir / target if args.corpus_dir else None
        result = run_target(target, seconds=args.seconds, runs=args.runs, corpus_dir=corpus)
        results.append(result)
        print(_report([result]).splitlines()[-1], flush=True)
        if not result.ok:
            print(result.problem())
            for path in result.artifacts:
                print(f"reproduce: .venv/bin/python -m fuzz.{target} {path}")
    print()
    print(_report(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
