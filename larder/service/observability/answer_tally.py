"""Counting answers made outside aiohttp in batches, not one by one.

The short path answers a remembered narinfo in a few microseconds; updating four series and the
hit statistics for each answer would cost about as much again. :class:`AnswerTally` adds each
answer to a running total per (cache, protocol, status, lookup) and folds the totals into the
series and statistics at most :data:`FLUSH_DELAY` seconds later, after :data:`MAX_PENDING`
answers, and whenever this process renders ``/metrics`` or the hit statistics (their handlers
call :meth:`AnswerTally.flush` first), so what a process reports includes every answer it sent.
The series and the statistics end up exactly as if each answer had been counted on its own
(latencies land in the same histogram buckets and add up to the same sum).
"""

from __future__ import annotations

import asyncio
import bisect

from larder.core.hitstats import HitStats
from larder.service.internals import observe_many
from larder.service.observability.batching import flush_later
from larder.service.observability.metrics import LATENCY_BUCKETS, STATUS_CLASS, Metrics

#: Seconds answers wait, at most, to be folded into the series.
FLUSH_DELAY = 0.05
#: Answers gathered before the totals are folded in at once.
MAX_PENDING = 4096

#: What answers are totalled by: (cache, protocol, status, lookup, hit, by a writer).
TallyKey = tuple[str, str, int, str | None, bool, bool]


class _Total:
    __slots__ = ("buckets", "count", "seconds", "sent")

    def __init__(self) -> None:
        self.count = 0
        self.sent = 0
        self.seconds = 0.0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf


class AnswerTally:
    """Answers of one application, counted as
    :func:`~larder.service.observability.recording.count_answer`
    counts them (requests, latency, lookups, hit statistics) plus their sent body bytes."""

    def __init__(self, metrics: Metrics, hits: HitStats) -> None:
        self._metrics = metrics
        self._hits = hits
        self._totals: dict[TallyKey, _Total] = {}
        self._pending = 0
        self._timer: asyncio.TimerHandle | None = None

    def add(
        self,
        cache: str,
        protocol: str,
        status: int,
        seconds: float,
        sent: int,
        lookup: str | None = None,
        hit: bool = False,
        writer: bool = False,
    ) -> None:
        """One answer: ``lookup`` names the kind looked up (``hit`` says how it went, ``writer``
        whether the request's credentials could write to the cache)."""
        self.add_to((cache, protocol, status, lookup, hit, writer), seconds, sent)

    def add_to(self, key: TallyKey, seconds: float, sent: int) -> None:
        """:meth:`add` by the answer's :data:`TallyKey` (made once for answers repeated)."""
        total = self._totals.get(key)
        if total is None:
            total = self._totals[key] = _Total()
        total.count += 1
        total.sent += sent
        total.seconds += seconds
        total.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self._pending += 1
        if self._pending >= MAX_PENDING:
            self.flush()
        elif self._timer is None:
            self._timer = flush_later(FLUSH_DELAY, self.flush)

    def flush(self) -> None:
        """Fold every total gathered so far into the series and statistics."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending = 0
        if not self._totals:
            return
        totals, self._totals = self._totals, {}
        metrics, hits = self._metrics, self._hits
        for (cache, protocol, status, lookup, hit, writer), total in totals.items():
            status_class = STATUS_CLASS[min(status // 100, 5)]
            metrics.child(metrics.requests, cache, protocol, status_class).inc(total.count)
            observe_many(metrics.child(metrics.latency, protocol), total.buckets, total.seconds)
            if total.sent:
                metrics.child(metrics.sent, cache, protocol).inc(total.sent)
            if lookup is not None:
                metrics.lookup(cache, protocol, lookup, hit, total.count, writer=writer)
                if not writer:
                    hits.record(cache, protocol, hit, total.count)
