"""The memory of served narinfos: bounded, short-lived, forgotten on upload."""

from __future__ import annotations

from larder.core.servedcache import (
    MISS_TTL,
    REFRESH_AHEAD,
    LocalWriteCounter,
    ServedCache,
    write_bucket,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_entries_expire_and_misses_expire_sooner() -> None:
    clock = Clock()
    cache = ServedCache(ttl=10, clock=clock)
    cache.put(("main", "a", "k"), b"narinfo")
    cache.put(("main", "b", "k"), None)
    assert cache.get(("main", "a", "k")) == (True, b"narinfo")
    assert cache.get(("main", "b", "k")) == (True, None)
    clock.now = MISS_TTL + 0.1
    assert cache.get(("main", "b", "k")) == (False, None)
    assert cache.get(("main", "a", "k")) == (True, b"narinfo")
    clock.now = 10.1
    assert cache.get(("main", "a", "k")) == (False, None)


def test_bounded_least_recently_used_first() -> None:
    cache = ServedCache(ttl=10, max_entries=2)
    cache.put(("c", "1", "k"), b"1")
    cache.put(("c", "2", "k"), b"2")
    assert cache.get(("c", "1", "k"))[0]  # 1 is now the most recent
    cache.put(("c", "3", "k"), b"3")
    assert not cache.get(("c", "2", "k"))[0]
    assert cache.get(("c", "1", "k"))[0] and cache.get(("c", "3", "k"))[0]


def test_forget_and_disabled() -> None:
    cache = ServedCache(ttl=10)
    cache.put(("main", "a", "k1"), b"x")
    cache.put(("main", "a", "k2"), b"y")
    cache.put(("other", "a", "k1"), b"z")
    cache.forget("main", "a")
    assert not cache.get(("main", "a", "k1"))[0] and not cache.get(("main", "a", "k2"))[0]
    assert cache.get(("other", "a", "k1"))[0]
    off = ServedCache(ttl=0)
    off.put(("main", "a", "k"), b"x")
    assert not off.get(("main", "a", "k"))[0]


def test_an_entry_is_dropped_once_its_narinfo_was_stored_elsewhere() -> None:
    writes = LocalWriteCounter()  # shared, as the processes of one server share theirs
    one, other = ServedCache(ttl=10, writes=writes), ServedCache(ttl=10, writes=writes)
    assert write_bucket("main", "a") != write_bucket("main", "b")
    one.put(("main", "a", "k"), None)
    one.put(("main", "b", "k"), b"narinfo")
    one.put(("main", "c", "k"), b"narinfo of c")
    held = one.hold(("main", "c", "k"))
    assert held is not None and one.unchanged(held[0])
    assert one.get(("main", "a", "k")) == (True, None)
    other.forget("main", "a")  # stored through the other process
    other.forget("main", "c")  # stored again (`nix store sign`) through the other process
    assert one.get(("main", "a", "k")) == (False, None)
    assert not one.unchanged(held[0])
    assert one.get(("main", "c", "k")) == (False, None)
    assert one.get(("main", "b", "k")) == (True, b"narinfo")  # another bucket: kept


def test_a_lookup_begun_before_a_write_is_not_remembered() -> None:
    cache = ServedCache(ttl=10)
    key = ("main", "a", "k")
    for body in (None, b"the narinfo as it was"):
        mark = cache.mark(key)  # the lookup starts ...
        cache.forget("main", "a")  # ... an upload lands meanwhile ...
        cache.put(key, body, mark)  # ... and the lookup found what was there before
        assert cache.get(key) == (False, None)
        mark = cache.mark(key)
        cache.put(key, body, mark)
        assert cache.get(key) == (True, body)
    mark = cache.mark(key)
    cache.forget("main", "b")  # another bucket's write
    cache.put(key, b"narinfo", mark)
    assert cache.get(key) == (True, b"narinfo")


def test_an_entry_is_due_for_a_refresh_near_the_end_of_its_life() -> None:
    clock = Clock()
    cache = ServedCache(ttl=10, clock=clock)
    cache.put(("main", "a", "k"), b"narinfo")
    cache.put(("main", "b", "k"), None)
    assert not cache.due(("main", "a", "k")) and not cache.due(("main", "b", "k"))
    assert not cache.due(("main", "a", "other key")) and not cache.due(("main", "c", "k"))
    clock.now = MISS_TTL * (1 - REFRESH_AHEAD) + 0.01  # a miss lives MISS_TTL
    assert cache.due(("main", "b", "k")) and not cache.due(("main", "a", "k"))
    clock.now = 10 * (1 - REFRESH_AHEAD) + 0.01
    assert cache.due(("main", "a", "k"))
    assert cache.get(("main", "a", "k")) == (True, b"narinfo")  # still answers meanwhile
    cache.put(("main", "a", "k"), b"narinfo again")  # what the refresh found
    assert not cache.due(("main", "a", "k"))
    assert cache.get(("main", "a", "k")) == (True, b"narinfo again")


def test_a_held_entry_stays_current_until_replaced_forgotten_evicted_or_expired() -> None:
    clock = Clock()
    cache = ServedCache(ttl=10, max_entries=2, clock=clock)
    key = ("main", "a", "k")
    cache.put(key, b"narinfo")
    held = cache.hold(key)
    assert held is not None
    entry, seconds = held
    assert entry.current and entry.body == b"narinfo"
    assert seconds == 10 * (1 - REFRESH_AHEAD)  # until it is due
    cache.put(key, b"narinfo")  # a refresh: a new entry
    assert not entry.current
    entry = cache.hold(key)[0]  # type: ignore[index]
    cache.forget("main", "a")
    assert not entry.current and cache.hold(key) is None
    cache.put(key, b"narinfo")
    entry = cache.hold(key)[0]  # type: ignore[index]
    cache.put(("main", "b", "k"), b"b")
    cache.put(("main", "c", "k"), b"c")  # the bound pushes "a" out
    assert not entry.current
    cache.put(key, b"narinfo")
    entry = cache.hold(key)[0]  # type: ignore[index]
    clock.now = 10.0
    assert cache.get(key) == (False, None)  # found expired
    assert not entry.current


def test_misses_due_entries_and_other_keys_are_not_held() -> None:
    clock = Clock()
    cache = ServedCache(ttl=10, clock=clock)
    cache.put(("main", "miss", "k"), None)
    cache.put(("main", "a", "k"), b"narinfo")
    assert cache.hold(("main", "miss", "k")) is None
    assert cache.hold(("main", "a", "other key")) is None
    assert cache.hold(("main", "absent", "k")) is None
    clock.now = 10 * (1 - REFRESH_AHEAD)
    assert cache.hold(("main", "a", "k")) is None  # due: asked about again
    assert cache.get(("main", "a", "k")) == (True, b"narinfo")
