"""larder-rustc with real cargo and rustc: CI fills the cache, a laptop elsewhere hits it.

The workspace (tests/rust-workspace) builds offline against Debian's registry crates. The CI
build and the laptop build use different checkout directories, target directories and state
directories, as two machines would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.harness import Larder, larder_server

WORKSPACE = Path(__file__).resolve().parents[1] / "rust-workspace"
SHIM = Path(sys.executable).parent / "larder-rustc"  # installed beside the test's Python
CACHEABLE = {"memchr", "itoa", "hex", "fnv", "leaf", "generated", "envconf"}


@dataclass
class Machine:
    checkout: Path
    target: Path
    state: Path
    url: str
    token: str | None = None

    def env(self, **extra: str) -> dict[str, str]:
        shim = str(SHIM)
        env = {
            **os.environ,
            "RUSTC_WRAPPER": shim,
            "LARDER_URL": self.url,
            "LARDER_STATE_DIR": str(self.state),
            "LARDER_LOG": str(self.state / "log"),
            "CARGO_TARGET_DIR": str(self.target),
            "CARGO_INCREMENTAL": "0",
            "CARGO_TERM_COLOR": "never",
        }
        env.pop("LARDER_TOKEN", None)
        env.pop("LARDER_DEMO_GREETING", None)
        if self.token:
            env["LARDER_TOKEN"] = self.token
        return {**env, **extra}

    def build(self, *cargo_args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        if (self.state / "log").exists():
            (self.state / "log").unlink()
        return subprocess.run(
            ["cargo", "build", "--offline", *cargo_args],
            cwd=self.checkout,
            env=self.env(**extra),
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )

    def run_demo(self) -> str:
        return subprocess.run(
            [str(self.target / "debug" / "demo")], capture_output=True, text=True, check=True
        ).stdout

    def stats(self) -> dict[str, object]:
        done = subprocess.run(
            [str(SHIM), "--stats", "--json"],
            env=self.env(),
            capture_output=True,
            text=True,
            check=True,
        )
        return dict(json.loads(done.stdout))

    def zero(self) -> None:
        subprocess.run([str(SHIM), "--zero-stats"], env=self.env(), check=True)

    def results(self) -> dict[str, str]:
        """crate -> result of this build's cacheable compilations, from LARDER_LOG."""
        found: dict[str, str] = {}
        log = self.state / "log"
        for line in log.read_text().splitlines() if log.exists() else []:
            fields = dict(part.split("=", 1) for part in line.split()[1:])
            if fields["crate"] in CACHEABLE:
                found[fields["crate"]] = fields["result"]
        return found


def machine(base: Path, name: str, server: Larder, token: str | None) -> Machine:
    checkout = base / name / "src" / "app"
    shutil.copytree(WORKSPACE, checkout, ignore=shutil.ignore_patterns("target"))
    return Machine(
        checkout, base / f"{name}-target", base / f"{name}-state", f"{server.url}/main", token
    )


def test_laptop_reuses_ci_compilations_from_another_directory(tmp_path: Path) -> None:
    with larder_server(str(tmp_path / "data"), tmp_path) as server:
        ci = machine(tmp_path, "ci", server, server.token())
        ci.build()
        assert ci.results() == dict.fromkeys(CACHEABLE, "miss")
        ci_stats = ci.stats()
        assert ci_stats["errors"] == 0 and ci_stats["uploads"] == len(CACHEABLE)
        expected_output = ci.run_demo()

        laptop = machine(tmp_path / "home" / "me", "laptop", server, token=None)
        laptop.build()
        assert laptop.results() == dict.fromkeys(CACHEABLE, "hit")
        laptop_stats = laptop.stats()
        assert (laptop_stats["hits"], laptop_stats["misses"], laptop_stats["errors"]) == (
            len(CACHEABLE), 0, 0,
        )  # fmt: skip
        assert laptop.run_demo() == expected_output

        # Cargo sees restored outputs as fresh: nothing is compiled again.
        laptop.build()
        assert laptop.results() == {}

        # One edited source: exactly that crate and its dependents miss.
        lib = laptop.checkout / "crates/leaf/src/lib.rs"
        lib.write_text(lib.read_text() + "\npub fn added() -> u8 { 1 }\n")
        laptop.build()
        assert laptop.results() == {"leaf": "miss", "generated": "miss"}

        # An env! variable the crate reads: only that crate misses, and its value is used.
        laptop.build(LARDER_DEMO_GREETING="bonjour")
        assert laptop.results() == {"envconf": "miss"}
        assert laptop.run_demo().startswith("bonjour from envconf")

        # A feature: the crate with the feature and its dependents miss.
        laptop.build("--features", "leaf/shout", LARDER_DEMO_GREETING="bonjour")
        assert laptop.results() == {"leaf": "miss", "generated": "miss"}
        assert laptop.run_demo().startswith("BONJOUR FROM ENVCONF")

    # The server is gone: the build still succeeds, compiling locally and counting errors.
    laptop.zero()
    lib.write_text(lib.read_text() + "\n// offline edit\n")
    laptop.build()
    # envconf too: LARDER_DEMO_GREETING is unset again.
    assert laptop.results() == dict.fromkeys(["leaf", "generated", "envconf"], "error")
    offline = laptop.stats()
    assert offline["errors"] == 3 and offline["hits"] == 0
    assert laptop.run_demo().startswith("hello from envconf")

    # Compiled locally in a third directory (the server is down), every rlib and rmeta is
    # byte-identical to CI's: the remapped outputs do not depend on where they were built.
    other = machine(tmp_path / "elsewhere", "other", server, token=None)
    other.build()
    ci_deps, other_deps = ci.target / "debug" / "deps", other.target / "debug" / "deps"
    libraries = sorted(p.name for p in ci_deps.glob("lib*.r*"))
    assert len(libraries) == 2 * len(CACHEABLE)
    for name in libraries:
        assert (other_deps / name).read_bytes() == (ci_deps / name).read_bytes(), name
