"""A bounded, short-lived memory of served narinfos (signed bytes, or "not here").

Serving a narinfo costs a storage read, a parse, an ed25519 signature and a render; Nix asks for
the same narinfos over and over. Entries live for ``ttl`` seconds (the replica's
``refresh_interval``, which already bounds how stale a replica may be about caches and tokens)
and misses for at most one second; an upload through this replica forgets its entry at once. A
narinfo overwritten through *another* replica is served in its old form for at most ``ttl``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

MAX_ENTRIES = 20_000
MISS_TTL = 1.0


class ServedCache:
    def __init__(
        self,
        ttl: float,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._clock = clock
        # (cache, store hash) -> (signing-key variant, body or None for a miss, expiry)
        self._entries: OrderedDict[tuple[str, str], tuple[str, bytes | None, float]] = OrderedDict()

    def get(self, key: tuple[str, str, str]) -> tuple[bool, bytes | None]:
        """``(known, body)`` for ``(cache, store hash, key variant)``; body None is a miss."""
        cache, store_hash, variant = key
        entry = self._entries.get((cache, store_hash))
        if entry is None or entry[0] != variant:
            return False, None
        _, body, expires = entry
        if self._clock() >= expires:
            del self._entries[(cache, store_hash)]
            return False, None
        self._entries.move_to_end((cache, store_hash))
        return True, body

    def put(self, key: tuple[str, str, str], body: bytes | None) -> None:
        if self._ttl <= 0:
            return
        cache, store_hash, variant = key
        ttl = self._ttl if body is not None else min(self._ttl, MISS_TTL)
        self._entries[(cache, store_hash)] = (variant, body, self._clock() + ttl)
        self._entries.move_to_end((cache, store_hash))
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def forget(self, cache: str, store_hash: str) -> None:
        self._entries.pop((cache, store_hash), None)
