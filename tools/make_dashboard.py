"""Writes helm/larder/dashboards/larder.json, larder's Grafana dashboard (hit rate first).

    .venv/bin/python tools/make_dashboard.py

The tests check that the committed file is what this script writes and evaluate every PromQL
expression in it against a real Prometheus scraping a real larder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parents[1] / "helm" / "larder" / "dashboards" / "larder.json"
# Every selector names the deployment(s) chosen ($job): two larder releases scraped by one
# Prometheus (staging and prod, each with a cache `main`) are never merged.
J = 'job=~"$job"'
C = f'{{{J},cache=~"$cache"}}'
R = "$__rate_interval"
#: The cache label of requests that name no cache (larder's NO_CACHE): it has lookup series at
#: 0, which a hit rate per cache would show as a NaN tile.
NO_CACHE = "_none"


def hit_rate(by: str, window: str = R, role: str = "reader") -> str:
    """Hits over lookups of ``role``: readers (laptops) by default; CI's lookups, made with a
    token that could write, include the one `nix copy` makes for each path it pushes."""
    selector = f'{J},cache=~"$cache",cache!="{NO_CACHE}",role="{role}"'
    hits = f'sum by ({by}) (rate(larder_cache_lookups_total{{{selector},result="hit"}}[{window}]))'
    total = f"sum by ({by}) (rate(larder_cache_lookups_total{{{selector}}}[{window}]))"
    return f"{hits} / {total}"


def stored(gauge: str) -> str:
    return f"sum by (kind) (max by (job, cache, kind) ({gauge}{C}))"


# (title, unit, [(expr, legend)], width, kind)
PANELS: list[tuple[str, str, list[tuple[str, str]], int, str]] = [
    ("Hit rate by protocol", "percentunit", [(hit_rate("protocol"), "{{protocol}}")], 12,
     "timeseries"),
    ("Hit rate per cache (last hour)", "percentunit",
     [(hit_rate("cache", "1h"), "{{cache}}")], 6, "stat"),
    ("Hit rate by protocol and kind (last hour)", "percentunit",
     [(hit_rate("protocol, kind", "1h"), "{{protocol}} {{kind}}")], 6, "bargauge"),
    # CI's own lookups (a token that could write): what it substituted or restored instead of
    # building; its narinfo misses include each path `nix copy` asks for before pushing it.
    ("CI hit rate by protocol (write tokens)", "percentunit",
     [(hit_rate("protocol", role="writer"), "{{protocol}}")], 8, "timeseries"),
    ("Requests per second", "reqps",
     [(f"sum by (protocol) (rate(larder_http_requests_total{C}[{R}]))", "{{protocol}}")], 8,
     "timeseries"),
    # 5xx only: every miss is a 404, so 4xx is mostly the cache working as it should.
    ("Server errors per second (5xx)", "reqps",
     [(f'sum by (protocol) (rate(larder_http_requests_total{{{J},cache=~"$cache",'
       f'status_class="5xx"}}[{R}]))', "{{protocol}}")], 8, "timeseries"),
    ("Latency p50 / p99", "s",
     [(f"histogram_quantile(0.5, sum by (le, protocol) "
       f"(rate(larder_http_request_duration_seconds_bucket{{{J}}}[{R}])))", "p50 {{protocol}}"),
      (f"histogram_quantile(0.99, sum by (le, protocol) "
       f"(rate(larder_http_request_duration_seconds_bucket{{{J}}}[{R}])))", "p99 {{protocol}}")],
     8, "timeseries"),
    ("Bytes served", "Bps",
     [(f"sum by (protocol) (rate(larder_transfer_sent_bytes_total{C}[{R}]))", "{{protocol}}")],
     8, "timeseries"),
    ("Bytes received", "Bps",
     [(f"sum by (protocol) (rate(larder_transfer_received_bytes_total{C}[{R}]))",
       "{{protocol}}")], 8, "timeseries"),
    ("Uploads and rejections", "reqps",
     [(f"sum by (outcome) (rate(larder_upload_requests_total{C}[{R}]))", "{{outcome}}")], 8,
     "timeseries"),
    # Not misses: a laptop without its read token for a private cache, or a writer's expired
    # token, is refused here while its builds go on without the cache.
    ("Refused for their token (401/403)", "reqps",
     [(f"sum by (protocol, needed) (rate(larder_access_refused_total{C}[{R}]))",
       "{{protocol}} needs {{needed}}")], 8, "timeseries"),
    # Every replica scans the same shared store and exports the same figures: one replica's
    # (max) per deployment and cache, summed over caches (and deployments chosen).
    ("Storage size", "bytes", [(stored("larder_storage_size_bytes"), "{{kind}}")], 8,
     "timeseries"),
    ("Stored objects", "short", [(stored("larder_storage_objects"), "{{kind}}")], 8,
     "timeseries"),
    ("Storage backend errors", "ops",
     [(f"sum by (backend, operation) (rate(larder_backend_errors_total{{{J}}}[{R}]))",
       "{{backend}} {{operation}}"),
      (f"sum by (backend) (rate(larder_backend_operations_total{{{J}}}[{R}]))",
       "{{backend}} calls")],
     8, "timeseries"),
    ("In-flight requests", "short",
     [(f"sum(larder_http_requests_in_flight{{{J}}})", "in flight")], 8, "timeseries"),
    ("Garbage collection runs", "short",
     [(f"sum by (result) (increase(larder_gc_runs_total{{{J}}}[{R}]))", "{{result}}"),
      (f"sum by (kind) (increase(larder_gc_evicted_objects_total{C}[{R}]))", "evicted {{kind}}"),
      (f"sum(increase(larder_gc_restored_objects_total{{{J}}}[{R}]))", "restored")], 8,
     "timeseries"),
    ("Garbage collection: bytes freed", "bytes",
     [(f"sum(increase(larder_gc_freed_bytes_total{{{J}}}[{R}]))", "freed")], 4, "timeseries"),
    ("Since the last collection", "s",
     [(f"time() - max(larder_gc_last_completed_timestamp_seconds{{{J}}} > 0)", "age")], 4,
     "stat"),
    # The category larder-rustc explained each miss with (a fixed label set; the crates missed
    # most, each with its main reason, are in the stats API: a crate is never a label).
    ("rustc misses by reason", "short",
     [(f"sum by (category) (increase(larder_rustc_miss_reasons_total{C}[{R}]))",
       "{{category}}")], 8, "timeseries"),
]  # fmt: skip


JOBS = "label_values(larder_http_requests_total, job)"
CACHES = f"label_values(larder_http_requests_total{{{J}}}, cache)"


def _choice(name: str, label: str, query: str, **extra: str) -> dict[str, Any]:
    """A template variable offering the values of ``query``, several or all."""
    return {
        "name": name,
        "type": "query",
        "label": label,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": query},
        "definition": query,
        **extra,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "refresh": 2,
    }


def panel(index: int, x: int, y: int, spec: tuple[str, str, list[tuple[str, str]], int, str]
          ) -> dict[str, Any]:  # fmt: skip
    title, unit, targets, width, kind = spec
    return {
        "id": index + 1,
        "type": kind,
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": width, "h": 8},
        "fieldConfig": {"defaults": {"unit": unit, "min": 0}, "overrides": []},
        "options": {},
        "targets": [
            {
                "refId": chr(ord("A") + n),
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "expr": expr,
                "legendFormat": legend,
            }
            for n, (expr, legend) in enumerate(targets)
        ],
    }


def dashboard() -> dict[str, Any]:
    panels, x, y = [], 0, 0
    for index, spec in enumerate(PANELS):
        if x + spec[3] > 24:
            x, y = 0, y + 8
        panels.append(panel(index, x, y, spec))
        x += spec[3]
    return {
        "title": "larder",
        "uid": "larder-overview",
        "description": "larder: hit rates per cache and protocol, traffic, latency, storage.",
        "tags": ["larder", "build-cache"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "type": "datasource",
                    "query": "prometheus",
                    "label": "Prometheus",
                },
                # The scrape job of each larder deployment (release) in this Prometheus.
                _choice("job", "Deployment", JOBS),
                _choice("cache", "Cache", CACHES, regex="/^[^_].*/"),
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render())
    sys.exit(0)
