"""Token verification: a remembered token still expires and can still be revoked."""

from __future__ import annotations

import pytest

from larder.core.auth import TokenAuthority
from larder.errors import Unauthorized
from larder.protocol.tokens import Scope
from larder.storage.memory import MemoryStorage


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_a_remembered_token_expires_on_time() -> None:
    clock = Clock()
    authority = TokenAuthority(MemoryStorage(), refresh_interval=0, clock=clock)
    token, claims = await authority.issue("main", Scope.WRITE, 60)
    assert (await authority.verify(token)).token_id == claims.token_id
    assert (await authority.verify(token)).token_id == claims.token_id  # remembered
    clock.now += 60
    with pytest.raises(Unauthorized, match="expired"):
        await authority.verify(token)


async def test_a_remembered_token_can_be_revoked() -> None:
    authority = TokenAuthority(MemoryStorage(), refresh_interval=0)
    token, claims = await authority.issue("main", Scope.READ, 0)
    await authority.verify(token)
    await authority.revoke(claims.token_id)
    with pytest.raises(Unauthorized, match="revoked"):
        await authority.verify(token)


async def test_a_forged_token_is_refused_every_time() -> None:
    authority = TokenAuthority(MemoryStorage(), refresh_interval=0)
    token, _ = await authority.issue("main", Scope.ADMIN, 0)
    header, payload, signature = token.split(".")
    forged = f"{header}.{payload}.{signature[:-4]}AAAA"
    for _ in range(2):
        with pytest.raises(Unauthorized, match=r"signature|malformed"):
            await authority.verify(forged)
