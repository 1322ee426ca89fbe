"""Adopting a signing key kept outside the store (a mounted secret)."""

from __future__ import annotations

from larder.core.caches import CacheRegistry
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
