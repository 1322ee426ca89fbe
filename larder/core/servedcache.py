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
        self._entries: OrderedDict[tuple[str, str, str], tuple[bytes | None, float]] = OrderedDict()

    def get(self, key: tuple[str, str, str]) -> tuple[bool, bytes | None]:
        """``(known, body)``: body None means a remembered miss."""
        entry = self._entries.get(key)
        if entry is None:
            return False, None
        body, expires = entry
        if self._clock() >= expires:
            del self._entries[key]
            return False, None
        self._entries.move_to_end(key)
        return True, body

    def put(self, key: tuple[str, str, str], body: bytes | None) -> None:
        if self._ttl <= 0:
            return
        ttl = self._ttl if body is not None else min(self._ttl, MISS_TTL)
        self._entries[key] = (body, self._clock() + ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def forget(self, cache: str, store_hash: str) -> None:
        for key in [k for k in self._entries if k[0] == cache and k[1] == store_hash]:
            del self._entries[key]
