"""``larder-rustc explain`` with real cargo: CI fills the cache, then a read-only laptop in another
directory builds with one change at a time, and explain names exactly that change for the crate
that changed and "dependency changed: <that crate>" for its dependents.

One CI build serves every case; each laptop build undoes the previous change (the crates it had
changed compile again and hit CI's entries, so they are not misses) and makes the next one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from pathlib import Path

from tests.e2e.harness import larder_server
from tests.e2e.test_rustc_shim import CACHEABLE, SHIM, Machine, machine

LEAF_DEPS = {"leaf", "itoa", "hex", "memchr", "fnv", "build_script_build/memchr"}


def explain(laptop: Machine) -> dict[str, dict[str, object]]:
    done = subprocess.run(
        [str(SHIM), "explain", "--json"], env=laptop.env(), capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    return {str(item["crate"]): item for item in json.loads(done.stdout)}


def reasons(laptop: Machine) -> dict[str, str]:
    """crate -> its one-line reason, for the last build; its misses are exactly those crates."""
    found = explain(laptop)
    misses = {name for name, result in laptop.results().items() if result == "miss"}
    assert set(found) == misses, (found, laptop.results())
    return {name: str(item["reason"]) for name, item in found.items()}


def test_explain_names_the_one_change_of_each_build(tmp_path: Path) -> None:
    with larder_server(str(tmp_path / "data"), tmp_path) as server:
        ci = machine(tmp_path, "ci", server, server.token())
        ci.build()
        assert ci.results() == dict.fromkeys(CACHEABLE, "miss")
        assert set(reasons(ci).values()) == {"never built"}

        laptop = machine(tmp_path / "home" / "me", "laptop", server, token=None)
        lib = laptop.checkout / "crates/leaf/src/lib.rs"
        original = lib.read_text()

        # A source edit in a leaf crate.
        lib.write_text(original + "\npub fn added() -> u8 { 1 }\n")
        laptop.build()
        assert reasons(laptop) == {
            "leaf": "source file: crates/leaf/src/lib.rs",
            "generated": "dependency changed: leaf",
            "demo": "dependency changed: leaf",
        }
        details = explain(laptop)["leaf"]["differences"]
        assert isinstance(details, list) and len(details) == 1, details
        assert str(details[0]).startswith("source file: crates/leaf/src/lib.rs (")

        # An env! variable (its value is never shown: it is not on the safe list).
        lib.write_text(original)
        laptop.build(LARDER_DEMO_GREETING="bonjour")
        assert reasons(laptop) == {
            "envconf": "env! variable: LARDER_DEMO_GREETING",
            "demo": "dependency changed: envconf",
        }
        assert "bonjour" not in json.dumps(explain(laptop))

        # A feature.
        laptop.build("--features", "leaf/shout")
        assert reasons(laptop) == {
            "leaf": 'features/cfg: --cfg=feature="shout"',
            "generated": "dependency changed: leaf",
            "demo": "dependency changed: leaf",
        }

        # A build script's output (the script is not compiled again, only run).
        laptop.build(LARDER_DEMO_SQUARES="9")
        assert reasons(laptop) == {
            "generated": "build-script output: squares.rs",
            "demo": "dependency changed: generated",
        }

        # RUSTFLAGS: every crate compiled with them differs by that flag.
        laptop.build("-p", "leaf", RUSTFLAGS="-C target-cpu=x86-64-v2")
        assert reasons(laptop) == dict.fromkeys(LEAF_DEPS, "flags: -C target-cpu=x86-64-v2")

        # Another rustc: a wrapper whose `rustc -vV` says something else.
        real = shutil.which("rustc")
        wrapper = tmp_path / "other-rustc" / "rustc"
        wrapper.parent.mkdir()
        wrapper.write_text(
            f'#!/bin/sh\nif [ "$1" = -vV ]; then {real} -vV | sed "s/^commit-date: /&1999-/"\n'
            f'else exec {real} "$@"; fi\n'
        )
        wrapper.chmod(0o755)
        laptop.build("-p", "leaf", RUSTC=str(wrapper))
        assert reasons(laptop) == dict.fromkeys(LEAF_DEPS, "toolchain: rustc -vV")

        # The counts: per laptop, and on the server, with the crates' main reasons.
        counted = laptop.stats()["miss_categories"]
        assert counted == {
            "source": 1, "env": 1, "features": 1, "build_script": 1, "flags": len(LEAF_DEPS),
            "toolchain": len(LEAF_DEPS), "dependency": 6,
        }  # fmt: skip
        with urllib.request.urlopen(f"{server.url}/api/v1/caches/main/stats") as resp:
            stats = json.load(resp)
        # CI's own first misses (never built) were a writer's: not the readers' statistics.
        assert "never_built" not in stats["rustc_misses_by_category"]
        assert stats["rustc_misses_by_category"]["dependency"] == 6
        top = {item["crate"]: item["reason"] for item in stats["top_missed_crates"]}
        assert top["generated"] == "dependency"  # twice a dependency on the laptop
