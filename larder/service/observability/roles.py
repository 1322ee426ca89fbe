"""Whether a request's credentials could write to its cache, remembered for the short path.

A writer's lookups (CI's, with a write token) are counted apart from readers'
(:mod:`larder.service.observability.metrics`, ``role``). Telling them apart needs the token
verified (:func:`~larder.service.routes.credentials.could_write`, by the application and the
short path alike), and the answer is remembered here by the ``Authorization`` value and the
cache for up to ``ttl`` seconds (the interval at which revocations are read). At most
:data:`MAX_ROLES` values are kept (all are dropped when one more comes).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

MAX_ROLES = 10_000


class Roles:
    """``(Authorization value, cache) -> writer`` for ``ttl`` seconds each."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._clock = clock
        self._known: dict[tuple[bytes, str], tuple[bool, float]] = {}

    def note(self, credentials: str, cache: str, writer: bool) -> None:
        """The application found ``credentials`` could (or could not) write to ``cache``."""
        if len(self._known) >= MAX_ROLES:
            self._known.clear()
        self._known[_digest(credentials), cache] = (writer, self._clock() + self._ttl)

    def writer(self, credentials: str, cache: str) -> bool | None:
        """Whether ``credentials`` could write to ``cache``; ``None`` if not known (lately)."""
        known = self._known.get((_digest(credentials), cache))
        if known is None or self._clock() >= known[1]:
            return None
        return known[0]


def _digest(credentials: str) -> bytes:
    """What a value is remembered by: its SHA-256, 32 bytes whatever its length (a client
    sending 10,000 different 8 KB values grew a worker by 78 MiB when they were kept)."""
    return hashlib.sha256(credentials.strip().encode("utf-8", "surrogateescape")).digest()
