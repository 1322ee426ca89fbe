"""Which objects a garbage collection evicts: closure-aware least-recently-used order.

The input is a graph of nodes, one per stored object (a narinfo, a NAR record, a rustc manifest,
a blob marker, an sccache entry...). A node's ``refs`` are the nodes it needs to stay useful: a
narinfo needs its references' narinfos and its NAR record, a rustc manifest needs the blob
markers of its outputs. The rules:

* **Closure**: a node is evicted only after every node that refers to it, so every surviving
  node still has its whole closure. Nodes on a reference cycle never lose their last referrer
  and are therefore kept.
* **Recency**: a node counts as used as recently as the most recently used node whose closure
  holds it (its *effective* time). Nodes go in order of effective time, oldest first; the order
  is monotonic because a node's effective time is never older than any of its referrers'.
* **Protection**: pinned nodes, nodes used within ``grace`` of ``now``, and the closures of both
  are never evicted.
* **Stopping**: eviction goes on while the scope is larger than ``max_size`` or the oldest
  candidate is older than ``retention``. Once neither holds it still takes what the evictions
  left without a referrer and that has the same effective time as the last eviction (the rest of
  a closure used as one, such as a narinfo's NAR record), then stops. So a closure goes whole
  and no NAR is left that nothing serves; other closures used at the same moment stay.
  Among nodes of one effective time, those an eviction released go before the tops of
  other closures, so the closure under way frees its blobs before another is begun.

Size is the bytes of the nodes' own objects plus the stored bytes of the distinct blobs they
hold: a blob shared by two nodes is freed only when both are gone.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Node:
    """One stored object as the collector sees it."""

    key: str
    kind: str
    used: float  # POSIX time of the last write or recorded read
    size: int  # bytes of the object itself
    refs: tuple[str, ...] = ()  # keys of the nodes this one needs
    blob: str | None = None  # blob id the object holds, if any
    pinned: bool = False


@dataclass(frozen=True)
class Policy:
    """Limits for one scope; ``None`` means no limit of that kind."""

    max_size: int | None = None
    retention: float | None = None  # seconds since last use
    grace: float = 600.0  # seconds: anything used this recently is kept with its closure

    @property
    def limited(self) -> bool:
        return self.max_size is not None or self.retention is not None


@dataclass
class Plan:
    """The outcome of :func:`plan`: what to evict, in a safe order, and the sizes."""

    evict: list[str] = field(default_factory=list)
    size_before: int = 0
    size_after: int = 0
    effective: dict[str, float] = field(default_factory=dict)
    protected: set[str] = field(default_factory=set)


def effective_times(nodes: Mapping[str, Node]) -> dict[str, float]:
    """Each node's effective time: the latest ``used`` of the nodes whose closure holds it."""
    effective: dict[str, float] = {}
    for source in sorted(nodes.values(), key=lambda node: node.used, reverse=True):
        if source.key in effective:
            continue  # reached from a more recently used node already
        effective[source.key] = source.used
        stack = [source.key]
        while stack:
            for ref in nodes[stack.pop()].refs:
                if ref in nodes and ref not in effective:
                    effective[ref] = source.used
                    stack.append(ref)
    return effective


def closure(nodes: Mapping[str, Node], roots: Iterable[str]) -> set[str]:
    """``roots`` (those that are nodes) and everything they refer to, transitively."""
    seen = {root for root in roots if root in nodes}
    stack = list(seen)
    while stack:
        for ref in nodes[stack.pop()].refs:
            if ref in nodes and ref not in seen:
                seen.add(ref)
                stack.append(ref)
    return seen


def referrers(nodes: Mapping[str, Node]) -> dict[str, set[str]]:
    """For each node, the other nodes that refer to it."""
    found: dict[str, set[str]] = defaultdict(set)
    for node in nodes.values():
        for ref in node.refs:
            if ref in nodes and ref != node.key:
                found[ref].add(node.key)
    return found


class Holder(Protocol):
    """Anything with a size of its own and possibly a blob (a :class:`Node`, a stored entry)."""

    @property
    def size(self) -> int: ...

    @property
    def blob(self) -> str | None: ...


def total_size(nodes: Iterable[Holder], blob_sizes: Mapping[str, int]) -> int:
    """Bytes of the nodes plus the distinct blobs they hold."""
    blobs: set[str] = set()
    size = 0
    for node in nodes:
        size += node.size
        if node.blob is not None:
            blobs.add(node.blob)
    return size + sum(blob_sizes.get(blob, 0) for blob in blobs)


def plan(
    nodes: Mapping[str, Node], blob_sizes: Mapping[str, int], policy: Policy, now: float
) -> Plan:
    """The nodes to evict under ``policy``, referrers before what they refer to."""
    effective = effective_times(nodes)
    fresh = now - policy.grace
    protected = closure(nodes, (n.key for n in nodes.values() if n.pinned or n.used >= fresh))
    waiting = {key: len(keys) for key, keys in referrers(nodes).items()}
    holders: dict[str, int] = defaultdict(int)
    for node in nodes.values():
        if node.blob is not None:
            holders[node.blob] += 1
    size = total_size(nodes.values(), blob_sizes)
    result = Plan(size_before=size, effective=effective, protected=protected)
    cutoff = now - policy.retention if policy.retention is not None else float("-inf")
    # (time, 1 for a closure's top | 0 for a node this plan released, key): at equal times the
    # closure under way goes whole before another's top is taken.
    ready = [
        (effective[key], 1, key) for key in nodes if not waiting.get(key) and key not in protected
    ]
    heapq.heapify(ready)
    group: float | None = None  # effective time of the last eviction
    released: set[str] = set()  # nodes whose last referrer this plan evicted
    while ready:
        when, _, key = ready[0]
        over = policy.max_size is not None and size > policy.max_size
        if not over and when >= cutoff and not (when == group and key in released):
            break
        group = when
        heapq.heappop(ready)
        node = nodes[key]
        result.evict.append(key)
        size -= node.size
        if node.blob is not None:
            holders[node.blob] -= 1
            if holders[node.blob] == 0:
                size -= blob_sizes.get(node.blob, 0)
        for ref in set(node.refs):
            if ref not in nodes or ref == key:
                continue
            waiting[ref] -= 1
            if waiting[ref] == 0 and ref not in protected:
                released.add(ref)
                heapq.heappush(ready, (effective[ref], 0, ref))
    result.size_after = size
    return result
