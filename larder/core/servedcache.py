"""A bounded, short-lived memory of served narinfos (signed bytes, or "not here").

Serving a narinfo costs a storage read, a parse, an ed25519 signature and a render; Nix asks for
the same narinfos over and over. Entries live for ``ttl`` seconds (the replica's
``refresh_interval``, which already bounds how stale a replica may be about caches and tokens)
and misses for at most one second; an upload through this replica forgets its entry at once. A
narinfo overwritten through *another* replica is served in its old form for at most ``ttl``.

Within one server, the processes share a :class:`WriteCounter`: one generation per bucket of
store hashes (:data:`WRITE_BUCKETS`), moved by every narinfo stored. An entry, hit or miss, is
dropped as soon as its bucket moved after its lookup began, so a path uploaded through one
process is never answered 404 by another, a narinfo stored again (``nix store sign``) is never
answered in its old form by another, and neither is a lookup that raced the upload. A push
drops only the entries that share a bucket with what it stored.

An entry asked for in the last :data:`REFRESH_AHEAD` of its life is :meth:`ServedCache.due`: the
owner looks it up again in the background while the entry still answers, so a narinfo asked for
all the time never makes a request wait for the store (the bound on staleness is unchanged).

:meth:`ServedCache.hold` lets a caller that answers the same narinfo many times a second check it
less often: it gives the remembered entry, which stays :attr:`Entry.current` until it is replaced,
forgotten, evicted or found expired, and the seconds until it is due; :meth:`ServedCache.unchanged`
tells, at the cost of one counter read, whether another process stored it again meanwhile.
"""

from __future__ import annotations

import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

MAX_ENTRIES = 20_000
MISS_TTL = 1.0
#: Store hashes are counted in this many buckets: a write drops the entries of its bucket only.
WRITE_BUCKETS = 16_384
#: The fraction of an entry's life, at its end, in which a use makes it due for a refresh.
REFRESH_AHEAD = 0.25


class WriteCounter(Protocol):
    """Counts narinfo writes per bucket of store hashes, possibly across processes."""

    def value(self, bucket: int) -> object:
        """Anything that compares unequal once another write to ``bucket`` was counted."""

    def bump(self, bucket: int) -> None:
        """Count one write to ``bucket``."""


class LocalWriteCounter:
    """A :class:`WriteCounter` for one process."""

    def __init__(self) -> None:
        self._counts = [0] * WRITE_BUCKETS

    def value(self, bucket: int) -> object:
        return self._counts[bucket]

    def bump(self, bucket: int) -> None:
        self._counts[bucket] += 1


def write_bucket(cache: str, store_hash: str) -> int:
    """The bucket a narinfo's writes are counted in (the same in every process)."""
    return zlib.crc32(f"{cache}/{store_hash}".encode()) % WRITE_BUCKETS


class Entry:
    """One remembered answer; ``current`` until this memory no longer holds it."""

    __slots__ = ("body", "bucket", "current", "expires", "refresh_at", "variant", "written")

    def __init__(
        self,
        variant: str,
        body: bytes | None,
        expires: float,
        written: tuple[int, object],
        refresh_at: float,
    ) -> None:
        self.variant = variant
        self.body = body
        self.expires = expires
        self.bucket, self.written = written  # its bucket's write count when the lookup began
        self.refresh_at = refresh_at  # from then on a use makes it due for a refresh
        self.current = True


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
        # (cache, store hash) -> its entry (for one signing-key variant)
        self._entries: OrderedDict[tuple[str, str], Entry] = OrderedDict()

    def lookup(self, key: tuple[str, str, str]) -> tuple[bool, bytes | None, bool]:
        """``(known, body, due)`` for ``(cache, store hash, key variant)``: body None is a miss;
        ``due``: the entry is in the last :data:`REFRESH_AHEAD` of its life (look it up again,
        and :meth:`put` what is found, to keep it)."""
        cache, store_hash, variant = key
        entry = self._entries.get((cache, store_hash))
        if entry is None or entry.variant != variant:
            return False, None, False
        now = self._clock()
        if now >= entry.expires or self._writes.value(entry.bucket) != entry.written:
            self._drop((cache, store_hash))
            return False, None, False
        self._entries.move_to_end((cache, store_hash))
        return True, entry.body, now >= entry.refresh_at

    def hold(self, key: tuple[str, str, str]) -> tuple[Entry, float] | None:
        """The entry remembering a narinfo (not a miss) for ``key``, and the seconds it may be
        used from now on without another :meth:`lookup` (until it is due, while it stays
        ``current``); ``None`` when this memory holds no such entry or it is due already."""
        cache, store_hash, variant = key
        entry = self._entries.get((cache, store_hash))
        if entry is None or entry.variant != variant or entry.body is None:
            return None
        left = entry.refresh_at - self._clock()
        return (entry, left) if left > 0 else None

    def unchanged(self, entry: Entry) -> bool:
        """Whether no process stored a narinfo in ``entry``'s bucket since its lookup began."""
        return self._writes.value(entry.bucket) == entry.written

    def get(self, key: tuple[str, str, str]) -> tuple[bool, bytes | None]:
        """``(known, body)`` for ``(cache, store hash, key variant)``; body None is a miss."""
        known, body, _ = self.lookup(key)
        return known, body

    def due(self, key: tuple[str, str, str]) -> bool:
        """Whether the entry for ``key`` is still good but due for a refresh (see
        :meth:`lookup`)."""
        return self.lookup(key)[2]

    def mark(self, key: tuple[str, str, str]) -> tuple[int, object]:
        """Take before looking ``key``'s narinfo up, and give to :meth:`put` with what was
        found."""
        bucket = write_bucket(key[0], key[1])
        return bucket, self._writes.value(bucket)

    def put(
        self,
        key: tuple[str, str, str],
        body: bytes | None,
        mark: tuple[int, object] | None = None,
    ) -> None:
        """Remember ``body`` (None: a miss) as looked up since ``mark`` (default: now)."""
        if self._ttl <= 0:
            return
        if mark is None:
            mark = self.mark(key)
        cache, store_hash, variant = key
        ttl = self._ttl if body is not None else min(self._ttl, MISS_TTL)
        now = self._clock()
        refresh_at = now + ttl * (1 - REFRESH_AHEAD)
        self._drop((cache, store_hash))
        self._entries[(cache, store_hash)] = Entry(variant, body, now + ttl, mark, refresh_at)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)[1].current = False

    def forget(self, cache: str, store_hash: str) -> None:
        """A narinfo was stored: forget it here, and count the write for the other processes."""
        self._drop((cache, store_hash))
        self._writes.bump(write_bucket(cache, store_hash))

    def _drop(self, pair: tuple[str, str]) -> None:
        entry = self._entries.pop(pair, None)
        if entry is not None:
            entry.current = False
