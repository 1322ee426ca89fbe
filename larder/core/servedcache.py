"""A bounded, short-lived memory of served narinfos (signed bytes, or "not here").

Serving a narinfo costs a storage read, a parse, an ed25519 signature and a render; Nix asks for
the same narinfos over and over. Entries live for ``ttl`` seconds (the replica's
``refresh_interval``, which already bounds how stale a replica may be about caches and tokens)
and misses for at most one second; an upload through this replica forgets its entry at once. A
narinfo overwritten through *another* replica is served in its old form for at most ``ttl``.

A remembered miss is dropped as soon as a narinfo was stored after the lookup began (a
:class:`WriteCounter`, which the processes of one server share), so a path uploaded through one
process is never answered 404 by another, nor by a lookup that raced the upload.

An entry asked for in the last :data:`REFRESH_AHEAD` of its life is :meth:`ServedCache.due`: the
owner looks it up again in the background while the entry still answers, so a narinfo asked for
all the time never makes a request wait for the store (the bound on staleness is unchanged).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

MAX_ENTRIES = 20_000
MISS_TTL = 1.0
#: The fraction of an entry's life, at its end, in which a use makes it due for a refresh.
REFRESH_AHEAD = 0.25


class WriteCounter(Protocol):
    """Counts narinfo writes, possibly across processes."""

    def value(self) -> object:
        """Anything that compares unequal once another write was counted."""

    def bump(self) -> None:
        """Count one write."""


class LocalWriteCounter:
    """A :class:`WriteCounter` for one process."""

    def __init__(self) -> None:
        self._count = 0

    def value(self) -> object:
        return self._count

    def bump(self) -> None:
        self._count += 1


class ServedCache:
    def __init__(
        self,
        ttl: float,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
        writes: WriteCounter | None = None,
    ) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._clock = clock
        self._writes = writes if writes is not None else LocalWriteCounter()
        # (cache, store hash) -> (signing-key variant, body or None, expiry, write count when a
        # miss was remembered, time from which a use makes the entry due for a refresh)
        self._entries: OrderedDict[
            tuple[str, str], tuple[str, bytes | None, float, object, float]
        ] = OrderedDict()

    def lookup(self, key: tuple[str, str, str]) -> tuple[bool, bytes | None, bool]:
        """``(known, body, due)`` for ``(cache, store hash, key variant)``: body None is a miss;
        ``due``: the entry is in the last :data:`REFRESH_AHEAD` of its life (look it up again,
        and :meth:`put` what is found, to keep it)."""
        cache, store_hash, variant = key
        entry = self._entries.get((cache, store_hash))
        if entry is None or entry[0] != variant:
            return False, None, False
        _, body, expires, written, refresh_at = entry
        now = self._clock()
        if now >= expires or (body is None and self._writes.value() != written):
            del self._entries[(cache, store_hash)]
            return False, None, False
        self._entries.move_to_end((cache, store_hash))
        return True, body, now >= refresh_at

    def get(self, key: tuple[str, str, str]) -> tuple[bool, bytes | None]:
        """``(known, body)`` for ``(cache, store hash, key variant)``; body None is a miss."""
        known, body, _ = self.lookup(key)
        return known, body

    def due(self, key: tuple[str, str, str]) -> bool:
        """Whether the entry for ``key`` is still good but due for a refresh (see
        :meth:`lookup`)."""
        return self.lookup(key)[2]

    def mark(self) -> object:
        """Take before looking a narinfo up, and give to :meth:`put` with what was found."""
        return self._writes.value()

    def put(self, key: tuple[str, str, str], body: bytes | None, mark: object = None) -> None:
        """Remember ``body`` (None: a miss) as looked up since ``mark`` (default: now)."""
        if self._ttl <= 0:
            return
        if mark is None:
            mark = self._writes.value()
        cache, store_hash, variant = key
        ttl = self._ttl if body is not None else min(self._ttl, MISS_TTL)
        now = self._clock()
        refresh_at = now + ttl * (1 - REFRESH_AHEAD)
        self._entries[(cache, store_hash)] = (variant, body, now + ttl, mark, refresh_at)
        self._entries.move_to_end((cache, store_hash))
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def forget(self, cache: str, store_hash: str) -> None:
        """A narinfo was stored: forget it here, and count the write for the other processes."""
        self._entries.pop((cache, store_hash), None)
        self._writes.bump()
