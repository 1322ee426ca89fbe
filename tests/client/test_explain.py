"""The shim explains its misses against a real server; a server without documents still works."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.client.test_shim import FakeCache, shim, stats
from tests.e2e.harness import larder_server

SOURCE = (
    'pub fn greeting() -> &\'static str { option_env!("LARDER_TEST_SECRET").unwrap_or("hi") }\n'
)
CARGO = {"CARGO_PKG_NAME": "t", "CARGO_PKG_VERSION": "0.1.0"}


def explain(crate: Path, *args: str) -> list[dict[str, object]]:
    done = subprocess.run(
        [sys.executable, "-m", "larder.client.shim", "explain", *args, "--json"],
        env={**os.environ, "LARDER_STATE_DIR": str(crate / "state")},
        capture_output=True,
        text=True,
        check=True,
    )
    return list(json.loads(done.stdout))


def checkout(base: Path, name: str) -> Path:
    crate = base / name / "src" / "t"
    (crate / "src").mkdir(parents=True)
    (crate / "src" / "lib.rs").write_text(SOURCE)
    (crate / "out").mkdir()
    return crate


def test_misses_are_explained_by_the_input_that_changed(tmp_path: Path) -> None:
    ci, laptop = checkout(tmp_path, "ci"), checkout(tmp_path, "laptop")
    with larder_server(str(tmp_path / "data"), tmp_path) as server:
        url = f"{server.url}/main"
        done = shim(ci, url, LARDER_TOKEN=server.token(), **CARGO)
        assert done.returncode == 0, done.stderr
        [first] = explain(ci)
        assert (first["crate"], first["category"], first["reason"]) == (
            "t", "never_built", "never built",
        )  # fmt: skip

        # A source edit on another machine, read-only.
        (laptop / "src" / "lib.rs").write_text(SOURCE + "pub fn more() {}\n")
        done = shim(laptop, url, **CARGO)
        assert done.returncode == 0, done.stderr
        [edited] = explain(laptop)
        assert edited["category"] == "source"
        assert edited["reason"] == "source file: src/lib.rs"
        assert explain(laptop, "t") == [edited] and explain(laptop, "other") == []

        # An env! value: named, its value never shown unless safe.
        (laptop / "src" / "lib.rs").write_text(SOURCE)
        done = shim(laptop, url, LARDER_TEST_SECRET="hunter2", **CARGO)
        assert done.returncode == 0, done.stderr
        [secret] = explain(laptop)
        assert secret["reason"] == "env! variable: LARDER_TEST_SECRET"
        assert "hunter2" not in json.dumps(secret) and "unset -> blake3:" in json.dumps(secret)
        done = shim(
            laptop, url, LARDER_TEST_SECRET="hunter2", LARDER_EXPLAIN_SAFE_ENV="LARDER_TEST_*",
            **CARGO,
        )  # fmt: skip
        assert 'unset -> \\"hunter2\\"' in json.dumps(explain(laptop))

        counted = stats(laptop)
        assert counted["misses"] == 3
        assert counted["miss_categories"] == {"source": 1, "env": 2}
        with urllib.request.urlopen(f"{server.url}/api/v1/caches/main/stats") as resp:
            api = json.load(resp)
        # The laptop's (a reader's); CI's own first miss (never_built, with its write token) is
        # a writer's and stays out of the statistics.
        assert api["rustc_misses_by_category"] == {"env": 2, "source": 1}
        text = subprocess.run(
            [sys.executable, "-m", "larder.client.shim", "explain"],
            env={**os.environ, "LARDER_STATE_DIR": str(laptop / "state")},
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert text.startswith("t: env! variable: LARDER_TEST_SECRET\n")


def test_a_server_without_documents_means_unknown(tmp_path: Path) -> None:
    crate = checkout(tmp_path, "old")
    fake = FakeCache("404")  # answers 404 to everything, as a server older than documents
    try:
        done = shim(crate, fake.url, **CARGO)
    finally:
        fake.close()
    assert done.returncode == 0, done.stderr
    [miss] = explain(crate)
    assert miss["category"] == "unknown"
    assert not [r for r in fake.requests if r.startswith("POST")]  # nothing to report
    assert stats(crate)["miss_categories"] == {"unknown": 1}


def test_private_caches_and_entries_older_than_documents(tmp_path: Path) -> None:
    ci, laptop = checkout(tmp_path, "ci"), checkout(tmp_path, "laptop")
    data = tmp_path / "data"
    with larder_server(str(data), tmp_path) as server:
        server.cli("cache", "create", "secret", "--private")
        url = f"{server.url}/secret"
        done = shim(ci, url, LARDER_TOKEN=server.token("secret"), **CARGO)
        assert done.returncode == 0, done.stderr
        # A reader of the private cache: the lookups need its token, and work with it.
        (laptop / "src" / "lib.rs").write_text(SOURCE + "// edited\n")
        done = shim(laptop, url, LARDER_TOKEN=server.token("secret", "read"), **CARGO)
        assert done.returncode == 0, done.stderr
        assert [m["category"] for m in explain(laptop)] == ["source"]
        # Entries stored before inputs documents were: the crate looks never built.
        for name in ("inputs", "crate"):
            shutil.rmtree(data / "objects" / "caches" / "secret" / "rustc" / name)
        (laptop / "src" / "lib.rs").write_text(SOURCE + "// edited again\n")
        done = shim(laptop, url, LARDER_TOKEN=server.token("secret", "read"), **CARGO)
        assert done.returncode == 0, done.stderr
        assert [m["reason"] for m in explain(laptop)] == ["never built"]


def test_dependencies_are_followed_down_to_the_crate_that_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from larder.client import explain as why
    from larder.protocol.inputs import Difference, Explanation

    def miss(crate: str, category: str, *changed: str, build: str = "this") -> None:
        monkeypatch.setattr(why, "build_id", lambda: build)
        own = [Difference(category, "crates/x/src/lib.rs", "changed")] if not changed else []
        found = Explanation(category, [*own, *(Difference("dependency", c, "") for c in changed)])
        externs = {name: f"{name}-1" for name in changed}
        why.record(tmp_path, crate=crate, package=crate, stem=f"{crate}-1", explanation=found,
                   externs=externs)  # fmt: skip

    miss("old", "source", build="earlier")
    miss("leaf", "source")
    miss("generated", "dependency", "leaf")
    miss("demo", "dependency", "generated", "leaf", "native")  # native did not miss
    assert why.command(["explain"], tmp_path) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if not line.startswith(" ")] == [
        "leaf: source file: crates/x/src/lib.rs",
        "generated: dependency changed: leaf",
        "demo: dependency changed: leaf, native",
    ]
    assert why.command(["explain", "nothing"], tmp_path) == 1


def test_what_a_stored_document_says_reaches_the_terminal_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from larder.client import explain as why
    from larder.protocol.inputs import Difference, Explanation

    hostile = "src/\x1b]0;owned\x07lib.rs\r\x1b[2Kall good"
    explanation = Explanation("source", [Difference("source", hostile, "\x9b31m")])
    why.record(tmp_path, crate="t", package="t", stem="t-x", explanation=explanation, externs={})
    assert why.command(["explain"], tmp_path) == 0
    shown = capsys.readouterr().out
    assert not any((ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) <= 0x9F for c in shown), shown
    assert "src/\\x1b]0;owned\\x07lib.rs\\x0d\\x1b[2Kall good" in shown


def test_help_is_text_and_reads_no_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--help`` printed the module's docstring markup; ``explain --help`` printed the last
    build's explanations instead."""
    from larder.client.shim import main

    monkeypatch.setenv("LARDER_STATE_DIR", str(tmp_path / "state"))
    for argv, usage in ((["--help"], "usage: RUSTC_WRAPPER=larder-rustc"),
                        (["explain", "--help"], "usage: larder-rustc explain")):  # fmt: skip
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert out.startswith(usage) and "``" not in out and ":mod:" not in out
    assert main([]) == 2  # cargo never calls it so: a person did, and gets the usage
    assert capsys.readouterr().err.startswith("usage:")
    assert not (tmp_path / "state").exists()
