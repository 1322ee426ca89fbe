"""Caches: named namespaces over the shared blob store, each with its own signing key.

A cache's settings live in the object store (``config/caches/<name>.json``) so every replica on
the same bucket sees the same caches and signs with the same key. Replicas keep an in-memory
view that is at most ``refresh_interval`` seconds old; a cache created elsewhere shows up on the
next lookup after that.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from larder.core import keys
from larder.errors import InvalidInput, StorageError
from larder.protocol.names import check_cache_name
from larder.protocol.signing import PublicKey, SecretKey
from larder.storage.base import Storage

DEFAULT_CACHE = "main"
#: Names found to be no cache that a registry remembers (the oldest is forgotten first).
MAX_UNKNOWN = 4096


@dataclass(frozen=True)
class CacheSettings:
    """One cache's settings. ``private`` caches need a read token for every read."""

    name: str
    signing_key: SecretKey
    private: bool = False
    priority: int = 30
    created_at: int = 0
    # Public keys (Nix format); when set, an uploaded narinfo must carry a signature by one.
    trusted_upload_keys: tuple[str, ...] = ()
    # Garbage collection limits of this cache (None: the configured default, see larder gc;
    # 0: no limit, not even the default).
    gc_max_size: int | None = None  # bytes: its objects plus the distinct blobs they hold
    gc_retention: float | None = None  # seconds since last use

    @property
    def public_key(self) -> PublicKey:
        return self.signing_key.public_key()

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "name": self.name,
                "signing_key": self.signing_key.to_string(),
                "private": self.private,
                "priority": self.priority,
                "created_at": self.created_at,
                "trusted_upload_keys": list(self.trusted_upload_keys),
                "gc_max_size": self.gc_max_size,
                "gc_retention": self.gc_retention,
            },
            indent=1,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> CacheSettings:
        try:
            doc = json.loads(data)
            return cls(
                name=check_cache_name(doc["name"]),
                signing_key=SecretKey.parse(doc["signing_key"]),
                private=bool(doc.get("private", False)),
                priority=int(doc.get("priority", 30)),
                created_at=int(doc.get("created_at", 0)),
                trusted_upload_keys=tuple(
                    PublicKey.parse(k).to_string() for k in doc.get("trusted_upload_keys", [])
                ),
                gc_max_size=_optional(doc.get("gc_max_size"), int),
                gc_retention=_optional(doc.get("gc_retention"), float),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise StorageError(f"corrupt cache settings: {exc}") from None


def _optional(value: Any, kind: Callable[[Any], Any]) -> Any:
    return None if value is None else kind(value)


class CacheExists(InvalidInput):
    """``create`` was asked for a cache that already exists."""

    code = "cache_exists"


class CacheRegistry:
    """Looks up and creates caches; remembers lookups for ``refresh_interval`` seconds."""

    def __init__(
        self,
        storage: Storage,
        refresh_interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._storage = storage
        self._refresh = refresh_interval
        self._clock = clock
        self._seen: dict[str, tuple[CacheSettings, float]] = {}
        #: When each name was last found to be no cache, oldest first, at most MAX_UNKNOWN
        #: (anyone can ask for any name: the memory of misses must not grow with them).
        self._unknown: dict[str, float] = {}
        #: Changes whenever this view's memory of any existing cache changes (a name that was
        #: no cache and still is changes nothing).
        self.version = 0

    async def get(self, name: str) -> CacheSettings | None:
        """The cache's settings, or ``None`` if there is no such cache. ``name`` is trusted."""
        fresh, settings = self._fresh(name)
        if fresh:
            return settings
        data = await self._storage.get(keys.cache_config(name))
        settings = CacheSettings.from_json(data) if data is not None else None
        self._remember(name, settings)
        return settings

    def _fresh(self, name: str) -> tuple[bool, CacheSettings | None]:
        """``(True, settings)`` when this view's answer for ``name`` is fresh enough to use."""
        hit = self._seen.get(name)
        if hit is not None and self._clock() - hit[1] < self._refresh:
            return True, hit[0]
        missed = self._unknown.get(name)
        if missed is not None and self._clock() - missed < self._refresh:
            return True, None
        return False, None

    def known(self, name: str) -> CacheSettings | None:
        """The cache's settings if this view holds them and they are fresh, without any I/O
        (``None``: no such cache, or not known right now: ask :meth:`get`)."""
        return self._fresh(name)[1]

    def fresh_for(self, name: str) -> float:
        """Seconds for which :meth:`known` keeps giving what it gives now for ``name``, unless
        :attr:`version` changes first (0 when it gives nothing now)."""
        hit = self._seen.get(name)
        since = hit[1] if hit is not None else self._unknown.get(name)
        return 0.0 if since is None else max(0.0, since + self._refresh - self._clock())

    def _remember(self, name: str, settings: CacheSettings | None) -> None:
        now = self._clock()
        self._unknown.pop(name, None)
        if settings is not None:
            self._seen[name] = (settings, now)
            self.version += 1
            return
        if self._seen.pop(name, None) is not None:
            self.version += 1
        self._unknown[name] = now
        if len(self._unknown) > MAX_UNKNOWN:
            del self._unknown[next(iter(self._unknown))]

    def _forget(self, name: str) -> None:
        self._seen.pop(name, None)
        self._unknown.pop(name, None)
        self.version += 1

    async def names(self) -> list[str]:
        prefix = keys.CACHE_CONFIG_PREFIX
        return [key[len(prefix) : -len(".json")] async for key in self._storage.keys(prefix)]

    async def all(self) -> list[CacheSettings]:
        """Every cache's settings (one dropped between the listing and its read is left out)."""
        return [found for name in await self.names() if (found := await self.get(name))]

    async def create(
        self,
        name: str,
        *,
        private: bool = False,
        priority: int = 30,
        key_name: str | None = None,
    ) -> CacheSettings:
        """Create a cache with a fresh ed25519 key; :class:`CacheExists` if it exists."""
        check_cache_name(name)
        key = SecretKey.generate(key_name or f"{name}.larder-{secrets.token_hex(3)}")
        settings = CacheSettings(name, key, private, priority, int(time.time()))
        if not await self._storage.put_if_absent(keys.cache_config(name), settings.to_json()):
            raise CacheExists(
                f"cache {name!r} already exists (`larder cache set {name}` changes its privacy "
                "or priority)"
            )
        self._remember(name, settings)
        return settings

    async def update(self, settings: CacheSettings) -> None:
        """Replace an existing cache's settings (privacy, priority, key rotation)."""
        await self._storage.put(keys.cache_config(settings.name), settings.to_json())
        self._remember(settings.name, settings)

    async def adopt_key(
        self, name: str, key: SecretKey, priority: int = 30, private: bool = False
    ) -> str:
        """Make ``key`` the cache's signing key, creating the cache if needed (``private`` says
        how; an existing cache keeps its privacy).

        Returns ``"created"``, ``"rotated"`` or ``"unchanged"``. For keys kept outside the store
        (a mounted Kubernetes Secret): every replica adopts the same key at start-up.
        """
        existing = await self.get(check_cache_name(name))
        if existing is None:
            settings = CacheSettings(name, key, private, priority, int(time.time()))
            if await self._storage.put_if_absent(keys.cache_config(name), settings.to_json()):
                self._remember(name, settings)
                return "created"
            self._forget(name)
            existing = await self.get(name)
            assert existing is not None
        if existing.signing_key.to_string() == key.to_string():
            return "unchanged"
        await self.update(replace(existing, signing_key=key))
        return "rotated"

    async def ensure(
        self, name: str, priority: int = 30, private: bool = False
    ) -> tuple[CacheSettings, bool]:
        """The cache, creating it if missing (``private`` says how); the flag says whether this
        call created it."""
        existing = await self.get(name)
        if existing is not None:
            return existing, False
        try:
            return await self.create(name, private=private, priority=priority), True
        except CacheExists:
            self._forget(name)
            settings = await self.get(name)
            assert settings is not None
            return settings, False
