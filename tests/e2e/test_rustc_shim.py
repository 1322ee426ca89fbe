"""larder-rustc with real cargo and rustc: CI fills the cache, a laptop elsewhere hits it.

The workspace (tests/rust-workspace) builds offline against Debian's registry crates: libraries,
build scripts, a proc-macro on syn, a library linking a C static library and a binary using
them all. The CI build and the laptop build use different checkout directories, target
directories and state directories, as two machines would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.harness import Larder, larder_server

WORKSPACE = Path(__file__).resolve().parents[1] / "rust-workspace"
SHIM = Path(sys.executable).parent / "larder-rustc"  # installed beside the test's Python
LIBRARIES = {
    "memchr", "itoa", "hex", "fnv", "leaf", "generated", "envconf", "native", "unicode_ident",
    "proc_macro2", "quote", "syn",
}  # fmt: skip
BUILD_SCRIPTS = {
    f"build_script_build/{package}"
    for package in ("memchr", "generated", "native", "proc-macro2", "quote", "syn")
}
LINKED = {"describe", "demo", *BUILD_SCRIPTS}  # the proc-macro, the binary and build scripts
CACHEABLE = LIBRARIES | LINKED
DEMO_OUTPUT_TAIL = "Report { greeting, total }\nnative answer 42\n"


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
        env.pop("LARDER_DEMO_SQUARES", None)
        env.pop("RUSTFLAGS", None)
        if self.token:
            env["LARDER_TOKEN"] = self.token
        return {**env, **extra}

    def build(self, *cargo_args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return self.cargo("build", *cargo_args, **extra)

    def cargo(
        self, command: str, *cargo_args: str, **extra: str
    ) -> subprocess.CompletedProcess[str]:
        if (self.state / "log").exists():
            (self.state / "log").unlink()
        done = subprocess.run(
            ["cargo", command, "--offline", *cargo_args],
            cwd=self.checkout,
            env=self.env(**extra),
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
        if self.token:  # as a CI job ends: until the uploads are sent
            subprocess.run([str(SHIM), "--wait-uploads", "120"], env=self.env(), check=True)
        return done

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
        """crate -> result of this build's compilations, from LARDER_LOG (build scripts as
        ``build_script_build/<package>``)."""
        found: dict[str, str] = {}
        log = self.state / "log"
        for line in log.read_text().splitlines() if log.exists() else []:
            fields = dict(part.split("=", 1) for part in line.split()[1:])
            name = fields["crate"]
            if name == "build_script_build":
                name = f"{name}/{fields['pkg']}"
            assert name not in found, f"{name} compiled twice"
            found[name] = fields["result"]
        return found


def machine(base: Path, name: str, server: Larder, token: str | None) -> Machine:
    checkout = base / name / "src" / "app"
    shutil.copytree(WORKSPACE, checkout, ignore=shutil.ignore_patterns("target"))
    return Machine(
        checkout, base / f"{name}-target", base / f"{name}-state", f"{server.url}/main", token
    )


def warned_in_out_dir(stderr: str) -> list[Path]:
    """The target directories cargo's report of the generated code's warning names (each the
    directory holding ``debug/build/generated-<hash>/out/squares.rs``, which must exist)."""
    assert "/larder/" not in stderr, stderr
    found = re.findall(r"--> (/\S+)/debug/build/(generated-[0-9a-f]{16})/out/squares\.rs:", stderr)
    for target, unit in found:
        assert (Path(target) / "debug" / "build" / unit / "out" / "squares.rs").is_file()
    return [Path(target) for target, _ in found]


def test_laptop_reuses_ci_compilations_from_another_directory(tmp_path: Path) -> None:
    with larder_server(str(tmp_path / "data"), tmp_path) as server:
        ci = machine(tmp_path, "ci", server, server.token())
        built = ci.build()
        assert ci.results() == dict.fromkeys(CACHEABLE, "miss")
        # The warning in generated code names this machine's target directory, as a plain
        # build's does (not the remapped /larder/target), compiled or restored.
        assert warned_in_out_dir(built.stderr) == [ci.target]
        ci_stats = ci.stats()
        assert ci_stats["errors"] == 0 and ci_stats["uploads"] == len(CACHEABLE)
        expected_output = ci.run_demo()

        # From another directory with an empty target directory, everything is a hit: the
        # proc-macro, the build scripts and the binary too, which runs (restored executable).
        laptop = machine(tmp_path / "home" / "me", "laptop", server, token=None)
        built = laptop.build()
        assert laptop.results() == dict.fromkeys(CACHEABLE, "hit")
        assert warned_in_out_dir(built.stderr) == [laptop.target]
        laptop_stats = laptop.stats()
        assert (laptop_stats["hits"], laptop_stats["misses"], laptop_stats["errors"]) == (
            len(CACHEABLE), 0, 0,
        )  # fmt: skip
        assert laptop_stats["non_cacheable"] == 0
        assert laptop.run_demo() == expected_output
        assert expected_output.endswith(DEMO_OUTPUT_TAIL)

        # Cargo sees restored outputs as fresh: nothing is compiled again.
        laptop.build()
        assert laptop.results() == {}

        # One edited source: exactly that crate and its dependents miss. The binary is
        # compiled here, so this rustc loads the proc-macro restored from CI's build.
        lib = laptop.checkout / "crates/leaf/src/lib.rs"
        lib.write_text(lib.read_text() + "\npub fn added() -> u8 { 1 }\n")
        laptop.build()
        assert laptop.results() == dict.fromkeys(["leaf", "generated", "demo"], "miss")
        assert laptop.run_demo() == expected_output

        # An env! variable the crate reads: only that crate misses, and its value is used.
        laptop.build(LARDER_DEMO_GREETING="bonjour")
        assert laptop.results() == {"envconf": "miss", "demo": "miss"}
        assert laptop.run_demo().startswith("bonjour from envconf")

        # A feature: the crate with the feature and its dependents miss.
        laptop.build("--features", "leaf/shout", LARDER_DEMO_GREETING="bonjour")
        assert laptop.results() == dict.fromkeys(["leaf", "generated", "demo"], "miss")
        assert laptop.run_demo().startswith("BONJOUR FROM ENVCONF")

        # The C static library the binary links changes (its build script compiles it into
        # OUT_DIR, outside the rlib): the binary misses and links the new code.
        answer = laptop.checkout / "crates/native/src/answer.c"
        answer.write_text(answer.read_text().replace("42", "43"))
        laptop.build("--features", "leaf/shout", LARDER_DEMO_GREETING="bonjour")
        assert laptop.results() == {"native": "miss", "demo": "miss"}
        assert laptop.run_demo().endswith("native answer 43\n")

        # Another `cc` first on PATH (the same compiler behind a wrapper script): libraries
        # still hit, everything linked compiles again.
        wrapped = machine(tmp_path / "wrapped", "wrapped", server, token=None)
        wrapper = tmp_path / "other-cc" / "cc"
        wrapper.parent.mkdir()
        wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("cc")} "$@"\n')
        wrapper.chmod(0o755)
        wrapped.build(PATH=f"{wrapper.parent}:{os.environ['PATH']}")
        assert wrapped.results() == {
            **dict.fromkeys(LIBRARIES, "hit"), **dict.fromkeys(LINKED, "miss"),
        }  # fmt: skip
        assert wrapped.run_demo() == expected_output

    # The server is gone: the build still succeeds, compiling locally and counting errors.
    laptop.zero()
    lib.write_text(lib.read_text() + "\n// offline edit\n")
    laptop.build()
    # envconf too: LARDER_DEMO_GREETING is unset again; the features changed leaf's.
    failed = ["leaf", "generated", "envconf", "demo"]
    assert laptop.results() == dict.fromkeys(failed, "error")
    offline = laptop.stats()
    assert offline["errors"] == len(failed) and offline["hits"] == 0
    assert laptop.run_demo().startswith("hello from envconf")

    # Compiled locally in a third directory (the server is down; CI's rustc also wrote its
    # link lines, this one does not), every rlib, rmeta, proc-macro, build script and binary
    # is byte-identical to CI's: the remapped outputs do not depend on where they were built.
    other = machine(tmp_path / "elsewhere", "other", server, token=None)
    other.build()
    debug = ci.target / "debug"
    outputs = sorted(
        p.relative_to(ci.target)
        for p in [*debug.glob("deps/*"), *debug.glob("build/*/build_script_build-*")]
        if p.suffix != ".d"
    )
    names = [p.name for p in outputs]
    assert len([n for n in names if n.endswith((".rlib", ".rmeta"))]) == 2 * len(LIBRARIES)
    assert len([n for n in names if n.startswith("build_script_build")]) == len(BUILD_SCRIPTS)
    assert len([n for n in names if n.endswith(".so") or n.startswith("demo-")]) == 2
    for name in outputs:
        assert (other.target / name).read_bytes() == (ci.target / name).read_bytes(), name


def test_explicit_target_into_target_directories_made_beforehand(tmp_path: Path) -> None:
    """A CI cache or a volume gives cargo a target directory it did not create (no
    CACHEDIR.TAG at its top), and ``--target`` puts the target's units under
    ``<target>/<triple>``, which cargo tags: every compilation still hits from elsewhere."""
    version = subprocess.run(["rustc", "-vV"], capture_output=True, text=True, check=True)
    host = next(line.split()[1] for line in version.stdout.splitlines() if line.startswith("host:"))
    with larder_server(str(tmp_path / "data"), tmp_path) as server:
        ci = machine(tmp_path, "ci", server, server.token())
        laptop = machine(tmp_path / "home" / "me", "laptop", server, token=None)
        outputs = []
        for build, result in ((ci, "miss"), (laptop, "hit")):
            build.target.mkdir(parents=True)
            build.build("--target", host)
            assert build.results() == dict.fromkeys(CACHEABLE, result)
            demo = build.target / host / "debug" / "demo"
            outputs.append(subprocess.run([demo], capture_output=True, text=True).stdout)
        assert ci.stats()["uploads"] == len(CACHEABLE)
        assert outputs[0] == outputs[1] and outputs[0].endswith(DEMO_OUTPUT_TAIL)


def test_cargo_check_outputs_reach_the_cache(tmp_path: Path) -> None:
    """After ``cargo check`` cargo sets each output's time back to when its compilation
    started, while the upload is being prepared: the uploads must still be made, so a second
    checkout's ``cargo check`` (an editor's, a laptop's) hits."""

    def results(build: Machine) -> list[str]:
        lines = (build.state / "log").read_text().splitlines()
        return sorted(" ".join(f for f in line.split()[1:] if f.startswith(("crate=", "result=")))
                      for line in lines)  # fmt: skip

    with larder_server(str(tmp_path / "data"), tmp_path) as server:
        ci = machine(tmp_path, "ci", server, server.token())
        ci.cargo("check")
        checked = results(ci)
        assert len(checked) > len(CACHEABLE) and all(r.endswith("result=miss") for r in checked)
        assert "changed-after-compiling" not in (ci.state / "log").read_text()
        assert ci.stats()["uploads"] == len(checked)
        laptop = machine(tmp_path / "home" / "me", "laptop", server, token=None)
        laptop.cargo("check")
        assert results(laptop) == [r.replace("result=miss", "result=hit") for r in checked]


def test_harness_false_targets_are_cached_as_binaries(tmp_path: Path) -> None:
    """Cargo compiles a ``harness = false`` test or bench (criterion's benches) without
    ``--crate-type``: a binary, cached as one, while ``--test`` harnesses compile locally."""
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "tests").mkdir()
    (project / "Cargo.toml").write_text(
        '[package]\nname = "runner"\nversion = "0.1.0"\nedition = "2021"\n\n'
        '[[test]]\nname = "custom"\nharness = false\n'
    )
    (project / "src" / "lib.rs").write_text("pub fn answer() -> u32 { 42 }\n")
    (project / "tests" / "custom.rs").write_text(
        'fn main() { assert_eq!(runner::answer(), 42); println!("custom runner ok"); }\n'
    )
    with larder_server(str(tmp_path / "data"), tmp_path) as server:
        runs = []
        for name, token in (("ci", server.token()), ("laptop", None)):
            checkout = tmp_path / name / "runner"
            shutil.copytree(project, checkout)
            build = Machine(
                checkout, tmp_path / f"{name}-target", tmp_path / f"{name}-state",
                f"{server.url}/main", token,
            )  # fmt: skip
            done = build.cargo("test", "--test", "custom")
            assert "custom runner ok" in done.stdout
            runs.append(build.results())
            assert build.stats()["non_cacheable"] == 0
        assert runs[0] == {"runner": "miss", "custom": "miss"}
        assert runs[1] == {"runner": "hit", "custom": "hit"}


def test_a_users_own_remap_of_the_workspace_hits_for_every_crate(tmp_path: Path) -> None:
    """Reproducible-build advice has the workspace remapped by the user
    (``--remap-path-prefix=$PWD=/build``). Cargo compiles registry crates in their own
    directories, where that flag names a directory outside every root: it must still be keyed
    the same from another checkout, or every dependency misses."""
    with larder_server(str(tmp_path / "data"), tmp_path) as server:
        builds = []
        for base, name, token in ((tmp_path, "ci", server.token()), (tmp_path / "me", "lap", None)):
            build = machine(base, name, server, token)
            build.target = build.checkout / "target"  # cargo's default place
            builds.append(build)
        outputs = []
        for build, result in zip(builds, ("miss", "hit"), strict=True):
            build.build(RUSTFLAGS=f"--remap-path-prefix={build.checkout}=/build")
            assert build.results() == dict.fromkeys(CACHEABLE, result)
            outputs.append(build.run_demo())
        assert outputs[0] == outputs[1] and outputs[0].endswith(DEMO_OUTPUT_TAIL)
