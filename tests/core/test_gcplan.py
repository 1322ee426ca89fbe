"""Eviction order and the closure rule on synthetic graphs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from larder.core.gc.plan import Node, Policy, closure, effective_times, plan, referrers, total_size

NOW = 1_000_000.0


@st.composite
def graphs(draw: st.DrawFn) -> tuple[dict[str, Node], dict[str, int]]:
    """A random acyclic graph (nodes refer only to earlier ones) with shared blobs."""
    count = draw(st.integers(min_value=0, max_value=40))
    blob_sizes = {f"b{i}": draw(st.integers(0, 1000)) for i in range(draw(st.integers(0, 8)))}
    nodes: dict[str, Node] = {}
    for index in range(count):
        key = f"n{index:02d}"
        refs = draw(st.lists(st.integers(0, index - 1), max_size=4)) if index else []
        self_ref = draw(st.booleans())
        nodes[key] = Node(
            key=key,
            kind="narinfo",
            used=NOW - draw(st.integers(0, 100)) * 60,
            size=draw(st.integers(0, 500)),
            refs=tuple(f"n{r:02d}" for r in refs) + ((key,) if self_ref else ()),
            blob=draw(st.sampled_from([None, *blob_sizes])),
            pinned=draw(st.integers(0, 9)) == 0,
        )
    return nodes, blob_sizes


policies = st.builds(
    Policy,
    max_size=st.one_of(st.none(), st.integers(0, 20_000)),
    retention=st.one_of(st.none(), st.integers(0, 100 * 60).map(float)),
    grace=st.integers(0, 30 * 60).map(float),
)


@settings(max_examples=300, deadline=None)
@given(graphs(), policies)
def test_plan_keeps_every_survivor_closed(
    graph: tuple[dict[str, Node], dict[str, int]], policy: Policy
) -> None:
    nodes, blob_sizes = graph
    result = plan(nodes, blob_sizes, policy, NOW)
    evicted = set(result.evict)
    assert len(evicted) == len(result.evict), "a node evicted twice"
    survivors = {k: n for k, n in nodes.items() if k not in evicted}
    for node in survivors.values():
        assert not evicted.intersection(node.refs), f"{node.key} lost part of its closure"
    # Referrers go before what they refer to.
    position = {key: i for i, key in enumerate(result.evict)}
    for key in result.evict:
        for ref in nodes[key].refs:
            if ref != key and ref in position:
                assert position[ref] > position[key]
    assert result.size_after == total_size(survivors.values(), blob_sizes)
    assert result.size_before == total_size(nodes.values(), blob_sizes)


@settings(max_examples=300, deadline=None)
@given(graphs(), policies)
def test_plan_never_evicts_protected_closures(
    graph: tuple[dict[str, Node], dict[str, int]], policy: Policy
) -> None:
    nodes, blob_sizes = graph
    result = plan(nodes, blob_sizes, policy, NOW)
    roots = [n.key for n in nodes.values() if n.pinned or n.used >= NOW - policy.grace]
    assert not closure(nodes, roots).intersection(result.evict)


@settings(max_examples=300, deadline=None)
@given(graphs(), policies)
def test_plan_evicts_least_recently_used_first_and_only_as_needed(
    graph: tuple[dict[str, Node], dict[str, int]], policy: Policy
) -> None:
    nodes, blob_sizes = graph
    result = plan(nodes, blob_sizes, policy, NOW)
    effective = effective_times(nodes)
    kept = [k for k in nodes if k not in set(result.evict) and k not in result.protected]
    if result.evict and kept:
        assert max(effective[k] for k in result.evict) <= min(effective[k] for k in kept)
    cutoff = NOW - policy.retention if policy.retention is not None else float("-inf")
    # Fits (or nothing evictable is left), and nothing expired and evictable is left.
    if policy.max_size is not None and result.size_after > policy.max_size:
        assert not kept
    assert all(effective[k] >= cutoff for k in kept)
    # Minimal: before the last eviction that was needed the policy was still violated, and
    # what it left without a referrer at the same effective time went with it.
    if result.evict:
        gone = set(result.evict)
        users = referrers(nodes)
        last = effective[result.evict[-1]]
        needed = max(
            i for i, k in enumerate(result.evict)
            if effective[k] != last or not users.get(k) or not users[k] <= gone or i == 0
        )  # fmt: skip
        before = {k: n for k, n in nodes.items() if k not in set(result.evict[:needed])}
        over = (
            policy.max_size is not None
            and total_size(before.values(), blob_sizes) > policy.max_size
        )
        assert over or effective[result.evict[needed]] < cutoff
        left = [
            k for k in kept
            if effective[k] == last and users.get(k) and users[k] <= gone
        ]  # fmt: skip
        assert not left, f"the closure evicted at {last} was left half evicted: {left}"


def test_effective_time_is_the_latest_user_of_the_closure() -> None:
    nodes = {
        "app": Node("app", "narinfo", used=50, size=1, refs=("lib",)),
        "tool": Node("tool", "narinfo", used=90, size=1, refs=("lib", "libc")),
        "lib": Node("lib", "narinfo", used=10, size=1, refs=("libc", "lib")),
        "libc": Node("libc", "narinfo", used=5, size=1),
        "alone": Node("alone", "narinfo", used=20, size=1),
    }
    assert effective_times(nodes) == {"app": 50, "tool": 90, "lib": 90, "libc": 90, "alone": 20}
    assert referrers(nodes)["libc"] == {"lib", "tool"}


def test_closure_goes_whole_in_lru_order() -> None:
    # Two closures of two paths each; the newer closure's top was used recently.
    nodes = {
        "old-top": Node("old-top", "narinfo", used=100, size=10, refs=("old-dep",)),
        "old-dep": Node("old-dep", "narinfo", used=100, size=10),
        "new-top": Node("new-top", "narinfo", used=900, size=10, refs=("new-dep",)),
        "new-dep": Node("new-dep", "narinfo", used=200, size=10),
    }
    result = plan(nodes, {}, Policy(max_size=25, grace=0), now=1000)
    assert result.evict == ["old-top", "old-dep"]
    assert result.size_after == 20


def test_a_closure_goes_whole_but_others_used_at_the_same_moment_stay() -> None:
    # Two closures read in the same second (as one nix copy queries them all): one must go.
    nodes = {
        f"{side}-{part}": Node(
            f"{side}-{part}", "narinfo", used=100, size=10,
            refs=(f"{side}-nar",) if part == "top" else (),
            blob=f"{side}-blob" if part == "nar" else None,
        )
        for side in ("a", "b")
        for part in ("top", "nar")
    }  # fmt: skip
    result = plan(nodes, {"a-blob": 100, "b-blob": 100}, Policy(max_size=235, grace=0), now=1000)
    assert result.evict == ["a-top", "a-nar"]  # a-top alone would fit; its NAR record goes too
    assert result.size_after == 120


def test_at_a_tie_the_closure_under_way_goes_whole_before_another_starts() -> None:
    # Every closure last used at the same moment (a store copied to a bucket: each object's
    # time is the copy's), and each dependency's key sorts after every top's: the plan took
    # the tops of all of them before the first NAR freed its blob, emptying the cache.
    nodes = {}
    for side in ("a", "b", "c"):
        nodes[f"top-{side}"] = Node(f"top-{side}", "narinfo", used=100, size=10,
                                    refs=(f"zz-nar-{side}",))  # fmt: skip
        nodes[f"zz-nar-{side}"] = Node(f"zz-nar-{side}", "nar", used=100, size=10,
                                       blob=f"blob-{side}")  # fmt: skip
    blobs = {f"blob-{side}": 1000 for side in "abc"}
    result = plan(nodes, blobs, Policy(max_size=2100, grace=0), now=1000)
    assert result.evict == ["top-a", "zz-nar-a"]
    assert result.size_after == 2040


def test_shared_dependency_stays_while_any_referrer_stays() -> None:
    nodes = {
        "a": Node("a", "narinfo", used=1, size=10, refs=("shared",)),
        "b": Node("b", "narinfo", used=2, size=10, refs=("shared",)),
        "shared": Node("shared", "narinfo", used=0, size=100),
    }
    result = plan(nodes, {}, Policy(max_size=110, grace=0), now=10)
    assert result.evict == ["a"]  # freeing "shared" would need "b" gone too; 110 already fits
    assert plan(nodes, {}, Policy(max_size=5, grace=0), now=10).evict == ["a", "b", "shared"]


def test_pinned_closure_and_cycles_are_kept() -> None:
    nodes = {
        "pin": Node("pin", "narinfo", used=0, size=10, refs=("dep",), pinned=True),
        "dep": Node("dep", "narinfo", used=0, size=10),
        "x": Node("x", "narinfo", used=0, size=10, refs=("y",)),
        "y": Node("y", "narinfo", used=0, size=10, refs=("x",)),
    }
    result = plan(nodes, {}, Policy(max_size=0, grace=0), now=10)
    assert result.evict == []
    assert result.protected == {"pin", "dep"}


def test_shared_blob_is_freed_once_with_its_last_holder() -> None:
    nodes = {
        "r1": Node("r1", "nar", used=1, size=0, blob="B"),
        "r2": Node("r2", "nar", used=2, size=0, blob="B"),
    }
    assert total_size(nodes.values(), {"B": 100}) == 100
    result = plan(nodes, {"B": 100}, Policy(max_size=50, grace=0), now=10)
    assert result.evict == ["r1", "r2"]
    assert result.size_after == 0


@pytest.mark.parametrize(
    ("retention", "expected"), [(None, []), (50.0, ["old"]), (5.0, ["old", "mid"])]
)
def test_retention_evicts_what_was_not_used_within_it(
    retention: float | None, expected: list[str]
) -> None:
    nodes = {
        "old": Node("old", "sccache_entry", used=0, size=1),
        "mid": Node("mid", "sccache_entry", used=60, size=1),
        "new": Node("new", "sccache_entry", used=99, size=1),
    }
    assert plan(nodes, {}, Policy(retention=retention, grace=0), now=100).evict == expected


def test_grace_keeps_recent_uploads_even_over_the_cap() -> None:
    nodes = {
        "fresh": Node("fresh", "narinfo", used=95, size=10, refs=("old",)),
        "old": Node("old", "narinfo", used=0, size=10),
    }
    assert plan(nodes, {}, Policy(max_size=0, grace=10), now=100).evict == []
