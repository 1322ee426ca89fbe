"""The shipped dashboard's queries, evaluated by promtool's rule unit tests on the series a
deployment exports (several replicas of one store), not only checked to parse."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from tools.make_dashboard import OUT as DASHBOARD


def promtool(tmp: Path, tests: list[dict[str, Any]], rules: Sequence[dict[str, Any]] = ()) -> str:
    """Run ``promtool test rules`` on ``tests`` (and alerting ``rules``); its output, or fail."""
    exe = shutil.which("promtool")
    assert exe, "promtool must be installed (make test installs Debian's prometheus package)"
    files: list[str] = []
    if rules:
        group = {"name": "t", "rules": list(rules)}
        (tmp / "rules.yml").write_text(yaml.safe_dump({"groups": [group]}))
        files.append("rules.yml")
    unit = {"rule_files": files, "evaluation_interval": "1m", "tests": tests}
    (tmp / "test.yml").write_text(yaml.safe_dump(unit))
    done = subprocess.run(
        [exe, "test", "rules", "test.yml"], cwd=tmp, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def panel_exprs(title: str, job: str = ".*") -> list[str]:
    """The panel's expressions with its variables at their All values (``job``: the
    deployment chosen)."""
    board = json.loads(DASHBOARD.read_text())
    found = [p for p in board["panels"] if p["title"] == title]
    assert found, f"no panel {title!r}"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    every_cache = variables["cache"]["allValue"]
    return [
        t["expr"]
        .replace("$cache", every_cache)
        .replace("$job", job)
        .replace("$__rate_interval", "5m")
        for t in found[0]["targets"]
    ]


def test_every_selector_names_the_deployments_chosen() -> None:
    """Two larder deployments scraped by one Prometheus are told apart by the `job` variable:
    every series a panel reads is selected by it, and the caches offered are the job's."""
    board = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    job = variables["job"]
    assert job["type"] == "query" and job["multi"] and job["includeAll"]
    assert job["query"]["query"] == "label_values(larder_http_requests_total, job)"
    assert 'job=~"$job"' in variables["cache"]["query"]["query"]
    selectors = 0
    for panel in board["panels"]:
        for target in panel["targets"]:
            for name, selector in re.findall(r"(larder_\w+)(\{[^}]*\})?", target["expr"]):
                assert 'job=~"$job"' in selector, (panel["title"], name, target["expr"])
                selectors += 1
    assert selectors > 20


def test_two_deployments_in_one_prometheus_are_not_merged(tmp_path: Path) -> None:
    """prod and staging, each with two replicas and a cache `main`: the storage panel shows the
    deployment chosen, or both added up, never the larger one's figure."""
    series = [
        {"series": f'larder_storage_size_bytes{{job="{job}",instance="{job}-{replica}",'
                   f'cache="main",kind="nar"}}', "values": f"{size}x10"}
        for job, size in (("larder-prod", 1000), ("larder-staging", 300))
        for replica in ("a", "b")
    ] + [
        {"series": f'larder_http_requests_total{{job="{job}",cache="main",protocol="nix",'
                   f'status_class="5xx"}}', "values": f"0+{per_minute}x10"}
        for job, per_minute in (("larder-prod", 6), ("larder-staging", 60))
    ]  # fmt: skip
    checks = []
    for job, size, errors in (("larder-prod", 1000, 0.1), ("larder-staging", 300, 1),
                              (".*", 1300, 1.1)):  # fmt: skip
        [stored] = panel_exprs("Storage size", job)
        [failing] = panel_exprs("Server errors per second (5xx)", job)
        checks += [
            {"expr": stored, "eval_time": "5m",
             "exp_samples": [{"labels": '{kind="nar"}', "value": size}]},
            {"expr": failing, "eval_time": "10m",
             "exp_samples": [{"labels": '{protocol="nix"}', "value": errors}]},
        ]  # fmt: skip
    promtool(tmp_path, [{"interval": "1m", "input_series": series, "promql_expr_test": checks}])


def lookups(
    result: str, per_minute: int, *, cache: str = "main", role: str = "reader"
) -> dict[str, str]:
    """A narinfo lookup counter of job larder growing by ``per_minute`` for 90 minutes."""
    labels = f'cache="{cache}",protocol="nix",kind="narinfo",result="{result}",role="{role}"'
    return {"series": f'larder_cache_lookups_total{{job="larder",{labels}}}',
            "values": f"0+{per_minute}x90"}  # fmt: skip


def test_hit_rate_per_cache_has_no_tile_for_requests_naming_no_cache(tmp_path: Path) -> None:
    """Requests that name no cache have lookup series at 0 (cache `_none`): with every cache
    chosen, the hit rate per cache shows the caches only, not a NaN tile for `_none`."""
    series = [lookups("hit", 30), lookups("miss", 10),
              lookups("hit", 0, cache="_none"), lookups("miss", 0, cache="_none")]  # fmt: skip
    [per_cache] = panel_exprs("Hit rate per cache (last hour)")
    check = {"expr": per_cache, "eval_time": "80m",
             "exp_samples": [{"labels": '{cache="main"}', "value": 0.75}]}  # fmt: skip
    promtool(tmp_path, [{"interval": "1m", "input_series": series, "promql_expr_test": [check]}])


def test_storage_panels_count_a_shared_store_once(tmp_path: Path) -> None:
    # Two replicas scan one store and export the same figures; two caches hold NARs.
    series = [
        {"series": f'{gauge}{{instance="{replica}",cache="{cache}",kind="nar"}}',
         "values": f"{value}x10"}
        for gauge in ("larder_storage_size_bytes", "larder_storage_objects")
        for replica in ("a", "b")
        for cache, value in (("main", 1000), ("pr", 500))
    ]  # fmt: skip
    [size] = panel_exprs("Storage size")
    [objects] = panel_exprs("Stored objects")
    checks = [
        {
            "expr": expr,
            "eval_time": "5m",
            "exp_samples": [{"labels": '{kind="nar"}', "value": 1500}],
        }
        for expr in (size, objects)
    ]
    promtool(tmp_path, [{"interval": "1m", "input_series": series, "promql_expr_test": checks}])


def test_error_panel_counts_server_errors_not_misses(tmp_path: Path) -> None:
    def requests(status_class: str, per_minute: int) -> dict[str, str]:
        labels = f'cache="main",protocol="nix",status_class="{status_class}"'
        return {"series": f"larder_http_requests_total{{{labels}}}", "values": f"0+{per_minute}x10"}

    [errors] = panel_exprs("Server errors per second (5xx)")
    series = [requests("2xx", 600), requests("4xx", 300), requests("5xx", 6)]
    check = {"expr": errors, "eval_time": "10m",
             "exp_samples": [{"labels": '{protocol="nix"}', "value": 0.1}]}  # fmt: skip
    promtool(tmp_path, [{"interval": "1m", "input_series": series, "promql_expr_test": [check]}])


def test_hit_rate_panels_and_alert_are_the_readers(tmp_path: Path) -> None:
    """CI's `nix copy` asks for every path before pushing it, with its write token: those misses
    (role="writer") are on the CI panel, not in the readers' hit rate nor in its alert."""
    series = [lookups("hit", 30), lookups("miss", 0),
              lookups("hit", 20, role="writer"), lookups("miss", 60, role="writer")]  # fmt: skip
    [readers] = panel_exprs("Hit rate by protocol")
    [ci] = panel_exprs("CI hit rate by protocol (write tokens)")
    checks = [
        {"expr": readers, "eval_time": "80m",
         "exp_samples": [{"labels": '{protocol="nix"}', "value": 1}]},
        {"expr": ci, "eval_time": "80m",
         "exp_samples": [{"labels": '{protocol="nix"}', "value": 0.25}]},
    ]  # fmt: skip
    alert = documented_alert("LarderHitRateFalling")
    quiet = {"eval_time": "85m", "alertname": "LarderHitRateFalling", "exp_alerts": []}
    test = {"interval": "1m", "input_series": series, "promql_expr_test": checks,
            "alert_rule_test": [quiet]}  # fmt: skip
    promtool(tmp_path, [test], [alert])
    # The same misses by readers fire it.
    series = [lookups("hit", 20), lookups("miss", 60)]
    fired = {"eval_time": "85m", "alertname": "LarderHitRateFalling",
             "exp_alerts": [{"exp_labels": {"cache": "main", "protocol": "nix",
                                            "severity": "warning"},
                             "exp_annotations": alert["annotations"] | {
                                 "summary": "larder main/nix hit rate below 50%"}}]}  # fmt: skip
    promtool(tmp_path, [{"interval": "1m", "input_series": series, "alert_rule_test": [fired]}],
             [alert])  # fmt: skip


def documented_alert(name: str) -> dict[str, Any]:
    """The alerting rule ``name`` as docs/operating.md gives it (in a YAML block)."""
    text = (DASHBOARD.parents[3] / "docs" / "operating.md").read_text()
    for block in re.findall(r"```yaml\n(.*?)```", text, re.S):
        stack: list[Any] = [yaml.safe_load(textwrap.dedent(block))]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                if node.get("alert") == name:
                    return node
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
    raise AssertionError(f"no alert {name} in docs/operating.md")


def test_gc_stale_alert_fires_when_no_collection_completes(tmp_path: Path) -> None:
    last = "larder_gc_last_completed_timestamp_seconds"
    runs = "larder_gc_runs_total"
    hours8 = 8 * 60

    def case(series: dict[str, str], fires: bool) -> dict[str, Any]:
        return {
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in series.items()],
            "alert_rule_test": [
                {"eval_time": "8h", "alertname": "LarderGcStale",
                 "exp_alerts": [{"exp_labels": {"severity": "warning"}}] if fires else []}
            ],
        }  # fmt: skip

    healthy_last = " ".join(str(60 * (m - m % 60)) for m in range(hours8 + 1))
    cases = [
        # One run completed at 10 min, none since.
        case({f'{last}{{instance="a"}}': f"600x{hours8}"}, fires=True),
        # Two replicas on a store never collected; every hourly run fails.
        case({f'{last}{{instance="a"}}': f"0x{hours8}", f'{last}{{instance="b"}}': f"0x{hours8}",
              f'{runs}{{instance="a",result="failed"}}': f"0+0.0167x{hours8}",
              f'{runs}{{instance="a",result="completed"}}': f"0x{hours8}"}, fires=True),
        # Hourly runs complete (one failure in between changes nothing).
        case({f'{last}{{instance="a"}}': healthy_last,
              f'{runs}{{instance="a",result="completed"}}': f"0+0.0167x{hours8}",
              f'{runs}{{instance="a",result="failed"}}': f"0x300 1x{hours8 - 301}"}, fires=False),
        # gc_interval 0 and an hourly `larder gc` job: the servers count no runs, only the
        # store's last run (gc/last-run) moves.
        case({f'{last}{{instance="a"}}': healthy_last}, fires=False),
        # Collection turned off (gc_interval 0): nothing runs, nothing is wrong.
        case({f'{last}{{instance="a"}}': f"0x{hours8}",
              f'{runs}{{instance="a",result="failed"}}': f"0x{hours8}"}, fires=False),
    ]  # fmt: skip
    promtool(tmp_path, cases, [documented_alert("LarderGcStale")])


def test_storage_full_alert_fires_on_refused_uploads_only(tmp_path: Path) -> None:
    uploads = "larder_upload_requests_total"

    def case(outcome: str, fires: bool) -> dict[str, Any]:
        series = f'{uploads}{{cache="main",protocol="nix",outcome="{outcome}"}}'
        expected = {"exp_labels": {"severity": "critical", "cache": "main", "protocol": "nix"}}
        return {
            "interval": "1m",
            "input_series": [{"series": series, "values": "0x10 1 2 3 4 5x20"}],
            "alert_rule_test": [{"eval_time": "16m", "alertname": "LarderStorageFull",
                                 "exp_alerts": [expected] if fires else []}],
        }  # fmt: skip

    cases = [case("storage_full", True), case("storage_error", False), case("accepted", False)]
    promtool(tmp_path, cases, [documented_alert("LarderStorageFull")])


def test_uploads_failing_alert_fires_when_most_uploads_are_refused(tmp_path: Path) -> None:
    """CI whose every push fails verification fires it; a cache whose pushes go through, one
    that is idle but for one failure, and laptops' sccache refused its probe PUT do not."""
    uploads = "larder_upload_requests_total"

    def case(per_minute: dict[str, float], fires: bool, protocol: str = "nix") -> dict[str, Any]:
        labels = f'cache="main",protocol="{protocol}"'
        expected = {
            "exp_labels": {"severity": "warning", "cache": "main", "protocol": protocol},
            "exp_annotations": {"summary": f"larder main/{protocol}: most uploads refused"},
        }
        return {
            "interval": "1m",
            "input_series": [
                {"series": f'{uploads}{{{labels},outcome="{outcome}"}}',
                 "values": f"0+{rate}x90"}
                for outcome, rate in per_minute.items()
            ],
            "alert_rule_test": [{"eval_time": "80m", "alertname": "LarderUploadsFailing",
                                 "exp_alerts": [expected] if fires else []}],
        }  # fmt: skip

    cases = [
        case({"verification_failed": 2, "accepted": 0.5}, fires=True),
        case({"bad_format": 1, "too_large": 1}, fires=True),
        case({"no_such_cache": 1}, fires=True),
        case({"accepted": 10, "verification_failed": 1}, fires=False),
        # an idle cache: one refused upload in the window, nothing else
        case({"verification_failed": 1 / 60}, fires=False),
        # read-only sccache clients refused their probe PUT as they start, CI's entries stored
        case({"forbidden": 5, "unauthorized": 1}, fires=False, protocol="sccache"),
        case({"forbidden": 5, "accepted": 1}, fires=False, protocol="sccache"),
    ]
    promtool(tmp_path, cases, [documented_alert("LarderUploadsFailing")])
    # The shipped rule, not only the test's copy of it, selects the refusals.
    assert (
        'outcome!~"accepted|unauthorized|forbidden"'
        in documented_alert("LarderUploadsFailing")["expr"]
    )


def test_writes_refused_alert_fires_on_refused_pushes_not_on_sccache_probes(
    tmp_path: Path,
) -> None:
    refused = "larder_access_refused_total"

    def case(protocol: str, needed: str, per_minute: float, fires: bool) -> dict[str, Any]:
        labels = f'cache="main",protocol="{protocol}",needed="{needed}"'
        summary = f"larder main/{protocol}: writes refused for their token"
        expected = {
            "exp_labels": {"severity": "warning", "cache": "main", "protocol": protocol},
            "exp_annotations": {"summary": summary},
        }
        return {
            "interval": "1m",
            "input_series": [{"series": f"{refused}{{{labels}}}", "values": f"0+{per_minute}x90"}],
            "alert_rule_test": [{"eval_time": "80m", "alertname": "LarderWritesRefused",
                                 "exp_alerts": [expected] if fires else []}],
        }  # fmt: skip

    cases = [
        case("nix", "write", 1, fires=True),  # CI's `nix copy` with an expired token
        case("rustc", "write", 0.1, fires=True),  # a CI job every 10 minutes, each refused
        case("nix", "write", 1 / 60, fires=False),  # one refusal an hour: a mistyped command
        case("nix", "read", 5, fires=False),  # laptops without their read token
        case("sccache", "write", 5, fires=False),  # read-only sccache's start-up probe
    ]
    promtool(tmp_path, cases, [documented_alert("LarderWritesRefused")])
