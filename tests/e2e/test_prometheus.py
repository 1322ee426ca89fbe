"""A real Prometheus scrapes a running larder while real traffic goes through it; every PromQL
expression of the shipped Grafana dashboard evaluates, and the hit-rate panels have data."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.e2e.harness import free_port, http, larder_server, wait_for_http
from tests.e2e.nix import Nix, NixVersion, netrc_for
from tools.make_dashboard import OUT as DASHBOARD
from tools.make_dashboard import render

SCRAPE_INTERVAL = "1s"


@contextmanager
def prometheus(tmp: Path, target: str) -> Iterator[str]:
    exe = shutil.which("prometheus")
    assert exe, "prometheus must be installed (make test installs Debian's package)"
    config = tmp / "prometheus.yml"
    config.write_text(
        f"global:\n  scrape_interval: {SCRAPE_INTERVAL}\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: larder\n    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )
    port = free_port()
    log = (tmp / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [exe, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/-/ready", proc, timeout=60)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def query(base: str, expr: str) -> dict[str, Any]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=30) as resp:
        return dict(json.load(resp))


def expressions() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"]) for panel in board["panels"] for target in panel["targets"]
    ]


def concrete(expr: str) -> str:
    # The job's name is the scrape job's (prometheus() above): the variable's values.
    return (
        expr.replace("$__rate_interval", "30s").replace("$cache", "main").replace("$job", "larder")
    )


def hit_rates(prom: str, expr: str) -> list[float]:
    answer = query(prom, concrete(expr))
    assert answer["status"] == "success", (expr, answer)
    return [float(sample["value"][1]) for sample in answer["data"]["result"]]


def all_hit_rates_known(prom: str) -> bool:
    """Whether every hit-rate panel has a rate yet (two scrapes with traffic between them in its
    window; a loaded machine may take a while)."""
    return all(
        any(math.isfinite(v) and 0 < v <= 1 for v in hit_rates(prom, expr))
        for title, expr in expressions()
        if title.startswith("Hit rate")
    )


def test_dashboard_file_is_current() -> None:
    assert DASHBOARD.read_text() == render(), "run: .venv/bin/python tools/make_dashboard.py"
    titles = [title for title, _ in expressions()]
    assert titles[0].startswith("Hit rate")  # hit rate first, on the wall screen


def test_every_dashboard_expression_evaluates_against_real_traffic(
    tmp_path: Path, nix_version: NixVersion
) -> None:
    env = {"LARDER_USAGE_INTERVAL": "1", "LARDER_GC_INTERVAL": "1"}  # collects, evicting nothing
    with larder_server(str(tmp_path / "data"), tmp_path, env) as server:
        target = server.url.removeprefix("http://")
        with prometheus(tmp_path, target) as prom:
            ci = Nix(tmp_path / "ci", netrc=netrc_for(server.token()), version=nix_version)
            paths = ci.build_closure(tmp_path)
            hashes = [Path(p).name[:32] for p in ci.closure(paths["app"])]
            for store_hash in hashes:  # misses before the push
                assert http("GET", f"{server.url}/main/{store_hash}.narinfo")[0] == 404
            ci.copy_to(f"{server.url}/main", paths["app"])
            token = server.token()
            http("PUT", f"{server.url}/main/sccache/a/b/entry", b"x" * 100, token)
            deadline = time.monotonic() + 90
            hit_rate = expressions()[0][1]
            while True:  # hits keep coming until Prometheus has rates for every hit-rate panel
                for store_hash in hashes:
                    assert http("GET", f"{server.url}/main/{store_hash}.narinfo")[0] == 200
                assert http("GET", f"{server.url}/main/sccache/a/b/entry")[0] == 200
                explained(server.url, "leaf", "source")
                result = query(prom, concrete(hit_rate))["data"]["result"]
                ready = len(result) >= 2 and all_hit_rates_known(prom)
                if (ready and source_misses(prom) > 0) or time.monotonic() > deadline:
                    break
                time.sleep(1)

            for title, expr in expressions():
                answer = query(prom, concrete(expr))
                assert answer["status"] == "success", (title, expr, answer)
                if title.startswith("Hit rate"):
                    values = [float(sample["value"][1]) for sample in answer["data"]["result"]]
                    assert values, f"no data for {title!r}: {expr}"
                    assert any(math.isfinite(v) and 0 < v <= 1 for v in values), (title, values)
            protocols = {
                sample["metric"]["protocol"]
                for sample in query(prom, concrete(hit_rate))["data"]["result"]
            }
            assert {"nix", "sccache"} <= protocols
            stored = query(prom, 'larder_storage_objects{cache="main",kind="narinfo"}')
            assert float(stored["data"]["result"][0]["value"][1]) == 3
            runs = query(prom, 'larder_gc_runs_total{result="completed"}')["data"]["result"]
            assert runs and float(runs[0]["value"][1]) >= 1
            age = query(prom, concrete(next(e for t, e in expressions() if "last coll" in t)))
            assert 0 <= float(age["data"]["result"][0]["value"][1]) < 120
            by_category = misses_by_reason(prom)
            assert by_category["source"] > 0 and by_category["never_built"] == 0, by_category


def misses_by_reason(prom: str) -> dict[str, float]:
    """The "rustc misses by reason" panel: category -> misses in its window."""
    reasons = query(prom, concrete(next(e for t, e in expressions() if "by reason" in t)))
    return {r["metric"]["category"]: float(r["value"][1]) for r in reasons["data"]["result"]}


def source_misses(prom: str) -> float:
    """The panel's ``source`` misses (two scrapes with a report between them in its window)."""
    return misses_by_reason(prom).get("source", 0.0)


def explained(base: str, crate: str, category: str) -> None:
    """What larder-rustc reports after explaining a miss."""
    body = json.dumps({"crate": crate, "category": category}).encode()
    request = urllib.request.Request(f"{base}/main/rustc/explained", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=30) as resp:
        assert resp.status == 204
