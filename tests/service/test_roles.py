"""The memory of credentials' roles the short path reads: per cache, for ``ttl`` seconds."""

from __future__ import annotations

import pytest

from larder.service.observability import roles
from larder.service.observability.roles import Roles


def test_a_role_is_known_per_cache_until_it_is_due_again() -> None:
    now = [100.0]
    known = Roles(ttl=10, clock=lambda: now[0])
    assert known.writer("Bearer t", "main") is None
    known.note("Bearer t ", "main", True)
    assert known.writer("Bearer t", "main") is True  # the value as sent, spaces aside
    assert known.writer("Bearer t", "other") is None
    known.note("Basic x", "main", False)
    assert known.writer("Basic x", "main") is False
    now[0] += 10
    assert known.writer("Bearer t", "main") is None  # a revocation may have been read since


def test_the_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(roles, "MAX_ROLES", 3)
    known = Roles(ttl=60)
    for n in range(3):
        known.note(f"Bearer {n}", "main", True)
    known.note("Bearer 3", "main", True)  # one more: the others are dropped
    assert [known.writer(f"Bearer {n}", "main") for n in range(4)] == [None, None, None, True]
