"""Adopting a signing key kept outside the store (a mounted secret)."""

from __future__ import annotations

from dataclasses import replace

from larder.core.caches import MAX_UNKNOWN, CacheRegistry
from larder.protocol.signing import SecretKey
from larder.storage.memory import MemoryStorage


async def test_adopt_key_creates_rotates_and_is_idempotent() -> None:
    storage = MemoryStorage()
    registry = CacheRegistry(storage, refresh_interval=0)
    first = SecretKey.generate("team.ops-1")
    assert await registry.adopt_key("team", first) == "created"
    assert await registry.adopt_key("team", first) == "unchanged"
    second = SecretKey.generate("team.ops-2")
    assert await registry.adopt_key("team", second) == "rotated"
    other = CacheRegistry(storage, refresh_interval=0)  # another replica sees it
    settings = await other.get("team")
    assert settings is not None
    assert settings.public_key.to_string() == second.public_key().to_string()
    assert await registry.names() == ["team"]


async def test_the_version_changes_with_what_is_known_and_fresh_for_counts_down() -> None:
    now = [0.0]
    registry = CacheRegistry(MemoryStorage(), refresh_interval=10, clock=lambda: now[0])
    assert registry.fresh_for("main") == 0.0
    start = registry.version
    settings, _ = await registry.ensure("main")
    assert registry.version != start
    now[0] = 4.0
    assert registry.fresh_for("main") == 6.0
    assert registry.known("main") is settings
    seen = registry.version
    await registry.update(replace(settings, private=True))
    assert registry.version != seen
    now[0] = 20.0
    assert registry.fresh_for("main") == 0.0 and registry.known("main") is None
    seen = registry.version
    assert await registry.get("main") is not None  # read again: a new memory
    assert registry.version != seen


class _Counting(MemoryStorage):
    reads = 0

    async def get(self, key: str) -> bytes | None:
        self.reads += 1
        return await super().get(key)


async def test_names_that_are_no_cache_are_remembered_within_a_bound() -> None:
    """Anyone may ask for any cache name: the registry's memory of misses stays bounded, and a
    miss changes nothing the short path keeps (the version)."""
    now = [0.0]
    storage = _Counting()
    registry = CacheRegistry(storage, refresh_interval=10, clock=lambda: now[0])
    await registry.ensure("main")
    version = registry.version
    for number in range(3 * MAX_UNKNOWN):
        assert await registry.get(f"nope{number}") is None
    assert registry.version == version
    assert len(registry._unknown) == MAX_UNKNOWN
    reads = storage.reads
    assert await registry.get(f"nope{3 * MAX_UNKNOWN - 1}") is None  # a recent miss: remembered
    assert storage.reads == reads
    await registry.create(f"nope{3 * MAX_UNKNOWN - 1}")  # a miss that became a cache
    assert registry.version != version
    assert registry.known(f"nope{3 * MAX_UNKNOWN - 1}") is not None
