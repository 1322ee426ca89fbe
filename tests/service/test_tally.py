"""Batched counting: the same series as counting each answer, folded in soon and on demand."""

from __future__ import annotations

import asyncio

from prometheus_client import generate_latest

from larder.core.hitstats import HitStats
from larder.service.observability.answer_tally import FLUSH_DELAY, AnswerTally
from larder.service.observability.metrics import LATENCY_BUCKETS, Metrics

LATENCIES = (0.00001, 0.0004, 0.0005, 0.003, 0.7, 30.0)  # below, on and between bounds, +Inf


def _series(metrics: Metrics) -> list[str]:
    text = generate_latest(metrics.registry).decode()
    return [
        line for line in text.splitlines() if line.startswith("larder_") and "_created" not in line
    ]


async def test_a_batch_gives_the_series_and_statistics_of_one_count_per_answer() -> None:
    one_by_one, batched = Metrics("memory"), Metrics("memory")
    hits_one, hits_batched = HitStats(), HitStats()
    for metrics in (one_by_one, batched):
        metrics.add_cache("main")
    tally = AnswerTally(batched, hits_batched)
    for n, seconds in enumerate(LATENCIES):
        hit = n % 2 == 0
        status = 200 if hit else 404
        one_by_one.latency.labels("nix").observe(seconds)
        one_by_one.requests.labels("main", "nix", "2xx" if hit else "4xx").inc()
        one_by_one.sent.labels("main", "nix").inc(100 + n)
        one_by_one.lookup("main", "nix", "narinfo", hit)
        hits_one.record("main", "nix", hit)
        tally.add("main", "nix", status, seconds, 100 + n, "narinfo", hit)
    assert _series(batched) != _series(one_by_one)  # nothing folded in yet
    tally.flush()
    assert _series(batched) == _series(one_by_one)
    assert hits_batched.rates("main") == hits_one.rates("main")
    assert len(LATENCY_BUCKETS) + 1 == len(batched.latency.labels("nix")._buckets)


async def test_answers_are_folded_in_within_the_delay() -> None:
    metrics = Metrics("memory")
    metrics.add_cache("main")
    tally = AnswerTally(metrics, HitStats())
    requests = metrics.requests.labels("main", "nix", "2xx")
    tally.add("main", "nix", 200, 0.0001, 10)
    tally.add("main", "nix", 200, 0.0001, 10)
    await asyncio.sleep(0)
    assert requests._value.get() == 0  # not after every turn ...
    await asyncio.sleep(FLUSH_DELAY * 3)
    assert requests._value.get() == 2  # ... but within the delay, both at once
    assert metrics.sent.labels("main", "nix")._value.get() == 20
