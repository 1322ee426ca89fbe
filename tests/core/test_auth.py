"""Token verification: a remembered token still expires, can still be revoked, and ends with
the secret that signed it."""

from __future__ import annotations

import json

import pytest

from larder.core import auth, keys
from larder.core.auth import TokenAuthority, fingerprint, record_secret_source
from larder.errors import LarderError, StorageError, StorageUnavailable, Unauthorized
from larder.protocol.tokens import Scope
from larder.storage.memory import MemoryStorage


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Flaky(MemoryStorage):
    """Memory storage whose reads fail while ``down``."""

    down = False

    async def get(self, key: str) -> bytes | None:
        if self.down:
            raise StorageUnavailable("connection refused")
        return await super().get(key)


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


async def test_the_replica_that_revokes_a_token_refuses_it_at_once() -> None:
    """`larder token revoke` through the API: the replica that wrote the revocation must not
    accept the token for another refresh_interval (other replicas learn of it then)."""
    authority = TokenAuthority(MemoryStorage(), refresh_interval=3600)
    token, claims = await authority.issue("main", Scope.WRITE, 0)
    await authority.verify(token)  # the revocations read now, and the token remembered
    await authority.revoke(claims.token_id, "leaked in a CI log")
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


async def test_a_replaced_secret_ends_older_tokens_once_read_again() -> None:
    """Replacing the secret must end every token on a running replica, remembered ones too."""
    storage = MemoryStorage()
    running = TokenAuthority(storage, refresh_interval=3600)
    elsewhere = TokenAuthority(storage, refresh_interval=0)  # the operator's command
    old, _ = await elsewhere.issue("main", Scope.ADMIN, 0)
    await running.verify(old)  # remembered
    await elsewhere.replace_secret()
    new, _ = await elsewhere.issue("main", Scope.READ, 0)
    with pytest.raises(Unauthorized, match="signature"):
        await elsewhere.verify(old)
    assert (await running.verify(old)).cache == "main"  # within refresh_interval: as it was
    running._secret_at = float("-inf")  # refresh_interval has passed
    with pytest.raises(Unauthorized, match="signature"):
        await running.verify(old)
    assert (await running.verify(new)).scope == Scope.READ


async def test_the_replica_that_replaces_the_secret_ends_older_tokens_at_once() -> None:
    """Replacing a leaked secret must end its tokens at once where it was replaced, not a
    refresh_interval later."""
    authority = TokenAuthority(MemoryStorage(), refresh_interval=3600)
    old, _ = await authority.issue("main", Scope.ADMIN, 0)
    await authority.verify(old)  # the secret read now, and the token remembered
    await authority.replace_secret()
    with pytest.raises(Unauthorized, match="signature"):
        await authority.verify(old)
    new, _ = await authority.issue("main", Scope.READ, 0)
    assert (await authority.verify(new)).scope == Scope.READ


async def test_a_token_made_after_a_replacement_works_at_once_and_reads_are_bounded() -> None:
    """A token signed with a secret replaced elsewhere makes a running replica read the secret
    again (not a refresh_interval later), and badly signed tokens cannot make it read the
    store more than once per SECRET_RECHECK."""

    class Counting(MemoryStorage):
        reads = 0

        async def get(self, key: str) -> bytes | None:
            self.reads += key == keys.TOKEN_SECRET
            return await super().get(key)

    storage = Counting()
    running = TokenAuthority(storage, refresh_interval=3600)
    elsewhere = TokenAuthority(storage, refresh_interval=0)
    old, _ = await elsewhere.issue("main", Scope.ADMIN, 0)
    await running.verify(old)  # the secret read just now: the new token must still work
    await elsewhere.replace_secret()
    new, _ = await elsewhere.issue("main", Scope.READ, 0)
    assert (await running.verify(new)).scope == Scope.READ
    with pytest.raises(Unauthorized, match="signature"):
        await running.verify(old)  # the new secret, once read, ends remembered old tokens
    strangers = TokenAuthority(MemoryStorage())  # another store's secret
    forged = [(await strangers.issue("main", Scope.ADMIN, 0))[0] for _ in range(21)]
    reads = storage.reads
    for token in forged[:20]:
        with pytest.raises(Unauthorized, match="signature"):
            await running.verify(token)
    assert storage.reads == reads  # read for the new token just now: not again so soon
    running._rechecked_at -= auth.SECRET_RECHECK
    with pytest.raises(Unauthorized, match="signature"):
        await running.verify(forged[20])
    assert storage.reads == reads + 1


async def test_a_deleted_secret_is_made_anew() -> None:
    storage = MemoryStorage()
    authority = TokenAuthority(storage, refresh_interval=0)
    token, _ = await authority.issue("main", Scope.READ, 0)
    await storage.delete(keys.TOKEN_SECRET)
    with pytest.raises(Unauthorized, match="signature"):
        await authority.verify(token)
    assert await storage.get(keys.TOKEN_SECRET) is not None


async def test_a_secret_that_cannot_be_read_again_is_kept(caplog: pytest.LogCaptureFixture) -> None:
    storage = Flaky()
    authority = TokenAuthority(storage, refresh_interval=0)
    token, _ = await authority.issue("main", Scope.READ, 0)
    storage.down = True
    assert (await authority.secret()) and "kept as it was" in caplog.text
    authority._verified.clear()
    fresh = TokenAuthority(storage, refresh_interval=0)
    with pytest.raises(StorageUnavailable):  # nothing read yet: no secret to keep
        await fresh.secret()
    storage.down = False
    assert (await fresh.verify(token)).cache == "main"


async def test_forged_tokens_in_an_outage_do_not_fill_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage = Flaky()
    authority = TokenAuthority(storage, refresh_interval=3600)
    await authority.secret()
    read_at = authority._secret_at
    storage.down = True
    forged, _ = await TokenAuthority(MemoryStorage()).issue("main", Scope.READ, 0)
    for _ in range(3):
        authority._rechecked_at -= auth.SECRET_RECHECK
        with pytest.raises(Unauthorized, match="signature"):  # refused, not a 503
            await authority.verify(forged)
    assert "kept as it was" not in caplog.text  # at DEBUG, not a warning per forged token
    assert authority._secret_at == read_at  # failed rechecks do not put off the scheduled read
    authority._secret_at -= 3600  # which, once due, warns
    assert await authority.secret() and "kept as it was" in caplog.text


async def test_a_stored_secret_that_is_not_hex_is_a_storage_error() -> None:
    storage = MemoryStorage()
    await storage.put(keys.TOKEN_SECRET, b"not hex at all\n")
    with pytest.raises(StorageError, match="not hex"):
        await TokenAuthority(storage).secret()


async def test_a_mounted_secret_is_read_again_and_not_replaced_in_the_store() -> None:
    storage = MemoryStorage()
    mounted = [b"a" * 32]
    authority = TokenAuthority(storage, refresh_interval=0, mounted=lambda: mounted[0])
    token, _ = await authority.issue("main", Scope.READ, 0)
    assert (await authority.verify(token)).cache == "main"
    mounted[0] = b"b" * 32  # the Secret was updated
    with pytest.raises(Unauthorized, match="signature"):
        await authority.verify(token)
    with pytest.raises(LarderError, match="mounted"):
        await authority.replace_secret()
    assert await storage.get(keys.TOKEN_SECRET) is None


async def test_the_marker_follows_a_mounted_secret_replaced_in_place() -> None:
    """The Secret updated in place: `token create` must compare against the new one."""
    storage = MemoryStorage()
    mounted = [b"a" * 32]
    await record_secret_source(storage, mounted[0])
    authority = TokenAuthority(storage, refresh_interval=0, mounted=lambda: mounted[0])
    await authority.secret()
    mounted[0] = b"b" * 32
    await authority.secret()
    marker = json.loads(await storage.get(keys.TOKEN_SECRET_MOUNTED) or b"{}")
    assert marker["fingerprint"] == fingerprint(b"b" * 32)


async def test_a_store_refusing_the_marker_only_warns(caplog: pytest.LogCaptureFixture) -> None:
    """Credentials kept from writing under config/ (as the security notes advise) must not stop
    a server from starting."""

    class Refusing(MemoryStorage):
        async def put(self, key: str, data: bytes) -> None:
            raise StorageError("S3 put failed: AccessDenied")

    class Gone(MemoryStorage):
        async def get(self, key: str) -> bytes | None:
            raise StorageUnavailable("bucket unreachable")

    await record_secret_source(Refusing(), b"a" * 32)
    assert any("cannot note" in r.getMessage() for r in caplog.records)
    with pytest.raises(StorageUnavailable):  # start-up waits for an unreachable store
        await record_secret_source(Gone(), b"a" * 32)
