"""Recent hit rates and most-missed crates, in memory and bounded (per replica).

Hits and misses are counted in one-minute buckets per (cache, protocol), kept for a day, so the
hit rate over the last hour and day costs a sum over at most 1440 buckets. Missed crates are
counted by name, at most :data:`MAX_CRATES` names per cache (the least-missed name makes room).
A Nix miss names only a store path hash; the hash is remembered (at most :data:`MAX_PENDING`)
and its misses are credited to the crate once a narinfo for it is uploaded, when the store path
name says which crate it is (``rust_<crate>-<version>``, as buildRustCrate names outputs).

The hashes asked for most and still missing are listed (:meth:`HitStats.top_missing`), and a
store path uploaded after it was asked for is remembered with the number of requests that came
before it, at most :data:`MAX_LATE` per cache, those asked for most kept
(:meth:`HitStats.pushed_late`): what CI pushes late, or never.

larder-rustc explains each miss it sees (:mod:`larder.protocol.inputs`) and reports the
category: misses are counted by category per cache, and by category per crate (at most
:data:`MAX_CRATES` crates), so the most-missed crates come with their main reason.

The service records readers here, not writers (requests whose token could write to the cache):
CI asks for what it is about to push, and its misses are not what laptops miss.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from larder.protocol.storepath import STORE_DIR

MAX_CRATES = 1000
MAX_PENDING = 10_000
MAX_LATE = 1000
DAY_MINUTES = 24 * 60
_RUST_PATH = re.compile(r"rust_([A-Za-z0-9_-]+?)-\d[^/]*$")
_CRATE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def crate_of_store_path_name(name: str) -> str | None:
    """``serde`` for ``rust_serde-1.0.200`` (a store path name without its hash), else None."""
    match = _RUST_PATH.match(name)
    return match.group(1) if match else None


class HitStats:
    def __init__(
        self, clock: Callable[[], float] = time.time, scope: str = "this replica since it started"
    ) -> None:
        self.scope = scope  # what the figures cover, as the stats API reports it
        self._clock = clock
        self._buckets: dict[tuple[str, str], deque[list[int]]] = {}
        self._missed: dict[str, dict[str, int]] = {}
        self._pending: OrderedDict[tuple[str, str], int] = OrderedDict()
        # cache -> store path name -> (requests before its upload, time of the upload)
        self._late: dict[str, dict[str, tuple[int, float]]] = {}
        # cache -> category -> misses; cache -> crate -> category -> misses
        self._categories: dict[str, dict[str, int]] = {}
        self._reasons: dict[str, dict[str, dict[str, int]]] = {}

    def record(self, cache: str, protocol: str, hit: bool, count: int = 1) -> None:
        minute = int(self._clock() // 60)
        buckets = self._buckets.get((cache, protocol))
        if buckets is None:
            buckets = self._buckets[(cache, protocol)] = deque(maxlen=DAY_MINUTES)
        if not buckets or buckets[-1][0] != minute:
            buckets.append([minute, 0, 0])
        buckets[-1][1 if hit else 2] += count

    def rates(self, cache: str) -> dict[str, dict[str, object]]:
        """Per protocol: hits, misses and hit rate over the last hour and day."""
        now = int(self._clock() // 60)
        report: dict[str, dict[str, object]] = {}
        for (name, protocol), buckets in self._buckets.items():
            if name != cache:
                continue
            entry: dict[str, object] = {}
            for label, minutes in (("hour", 60), ("day", DAY_MINUTES)):
                hits = sum(b[1] for b in buckets if now - b[0] < minutes)
                misses = sum(b[2] for b in buckets if now - b[0] < minutes)
                total = hits + misses
                entry[label] = {
                    "hits": hits,
                    "misses": misses,
                    "hit_rate": hits / total if total else None,
                }
            report[protocol] = entry
        return report

    def missed_crate(self, cache: str, crate: str, count: int = 1) -> None:
        if not _CRATE.fullmatch(crate):
            return
        counts = self._missed.setdefault(cache, {})
        if crate not in counts and len(counts) >= MAX_CRATES:
            del counts[min(counts, key=counts.__getitem__)]
        counts[crate] = counts.get(crate, 0) + count

    def explained(self, cache: str, crate: str, category: str) -> None:
        """A shim explained a miss of ``crate`` by ``category`` (a fixed set of names)."""
        counts = self._categories.setdefault(cache, {})
        counts[category] = counts.get(category, 0) + 1
        if not _CRATE.fullmatch(crate):
            return
        reasons = self._reasons.setdefault(cache, {})
        if crate not in reasons and len(reasons) >= MAX_CRATES:
            del reasons[min(reasons, key=lambda known: sum(reasons[known].values()))]
        per_crate = reasons.setdefault(crate, {})
        per_crate[category] = per_crate.get(category, 0) + 1

    def misses_by_category(self, cache: str) -> dict[str, int]:
        """Explained misses by category."""
        return dict(sorted(self._categories.get(cache, {}).items()))

    def missed_store_hash(self, cache: str, store_hash: str) -> None:
        key = (cache, store_hash)
        self._pending[key] = self._pending.pop(key, 0) + 1
        while len(self._pending) > MAX_PENDING:
            self._pending.popitem(last=False)

    def uploaded_store_path(self, cache: str, store_hash: str, name: str) -> None:
        """A narinfo arrived: credit earlier misses of its hash to its crate, and remember how
        often it was asked for before (``name``: the store path's name, without its hash)."""
        count = self._pending.pop((cache, store_hash), 0)
        if not count:
            return
        crate = crate_of_store_path_name(name)
        if crate:
            self.missed_crate(cache, crate, count)
        name = f"{store_hash}-{name}"
        late = self._late.setdefault(cache, {})
        if name not in late and len(late) >= MAX_LATE:
            del late[min(late, key=lambda known: late[known][0])]
        before = late.get(name, (0, 0.0))[0]
        late[name] = (before + count, self._clock())

    def top_missing(self, cache: str, limit: int = 20) -> list[dict[str, object]]:
        """The store hashes asked for most that no upload has answered yet."""
        counts = [(n, h) for (c, h), n in self._pending.items() if c == cache]
        ranked = sorted(counts, key=lambda item: (-item[0], item[1]))[:limit]
        return [{"store_hash": store_hash, "requests": n} for n, store_hash in ranked]

    def pushed_late(self, cache: str, limit: int = 20) -> list[dict[str, object]]:
        """Store paths uploaded after they had been asked for, those asked for most first."""
        late = self._late.get(cache, {})
        ranked = sorted(late.items(), key=lambda item: (-item[1][0], item[0]))[:limit]
        return [
            {
                "store_path": f"{STORE_DIR}/{name}",
                "requests_before_upload": n,
                "uploaded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when)),
            }
            for name, (n, when) in ranked
        ]

    def top_missed(self, cache: str, limit: int = 20) -> list[dict[str, object]]:
        """The crates missed most, each with its main reason: the category its explained misses
        had most often (None when none was explained)."""
        counts = self._missed.get(cache, {})
        reasons = self._reasons.get(cache, {})
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:limit]
        return [
            {"crate": crate, "misses": misses, "reason": _main(reasons.get(crate))}
            for crate, misses in ranked
        ]


def _main(categories: dict[str, int] | None) -> str | None:
    if not categories:
        return None
    return min(categories.items(), key=lambda item: (-item[1], item[0]))[0]
