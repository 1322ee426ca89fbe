"""Stateless signed tokens: issuing, verifying, revoking, and the access rule.

Tokens are HS256 JWTs (see :mod:`larder.protocol.tokens`) signed with one secret kept in the
object store (or mounted), so every replica accepts every other replica's tokens. Revocation
writes a marker object; replicas reload the set of revoked ids, and the secret, at most every
``refresh_interval`` seconds, so a replaced secret ends every older token on every replica;
a token with a bad signature makes the secret be read again at once (at most once a second for
such reads), so one made right after a replacement works at once.

Access rule: reading a public cache needs nothing; reading a private cache needs a ``read``
token for it; writing needs a ``write`` token; ``admin`` implies ``write`` implies ``read``.
A token names one cache or ``*`` (every cache).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable

from larder.core import keys
from larder.core.caches import CacheSettings
from larder.errors import Forbidden, LarderError, StorageError, StorageUnavailable, Unauthorized
from larder.protocol import tokens
from larder.protocol.tokens import Scope, TokenClaims, TokenError, expired_message
from larder.storage.base import Storage


def authorize(claims: TokenClaims | None, cache: CacheSettings, needed: Scope) -> None:
    """Raise :class:`Unauthorized` or :class:`Forbidden` unless ``claims`` allow ``needed``."""
    if needed == Scope.READ and not cache.private:
        return
    if claims is None:
        what = "this cache is private" if needed == Scope.READ else "writing needs a token"
        raise Unauthorized(f"{what}: send a token as Bearer or as the Basic auth password")
    if claims.cache not in ("*", cache.name):
        raise Forbidden("the token is not valid for this cache")
    if claims.scope < needed:
        raise Forbidden(f"the token's scope {claims.scope.name.lower()} does not allow this")


log = logging.getLogger(__name__)

#: Tokens remembered after their signature checked (then forgotten all at once).
VERIFIED_TOKENS = 4096
#: Seconds: how often a badly signed token may make the secret be read again.
SECRET_RECHECK = 1.0


def fingerprint(secret: bytes) -> str:
    """A short digest that tells token secrets apart without revealing one."""
    return hashlib.sha256(b"larder token secret\0" + secret).hexdigest()[:16]


async def record_secret_source(storage: Storage, mounted: bytes | None) -> None:
    """What a server notes at start-up, and again when its mounted secret changes: a marker
    object when it signs tokens with a mounted secret (with the secret's :func:`fingerprint`),
    none when it uses the store's. Advisory: a store that refuses the write (credentials kept
    from writing under ``config/``) gets a warning; an unreachable one raises."""
    try:
        if mounted is None:
            await storage.delete(keys.TOKEN_SECRET_MOUNTED)
            return
        marker = json.dumps({"fingerprint": fingerprint(mounted)}).encode()
        if await storage.get(keys.TOKEN_SECRET_MOUNTED) != marker:
            await storage.put(keys.TOKEN_SECRET_MOUNTED, marker)
    except StorageUnavailable:
        raise
    except StorageError as exc:
        log.warning(
            "cannot note in the store which token secret the servers use (%s): `larder token "
            "create` run without token_secret_file will not know to refuse",
            exc.message,
        )


async def check_secret_source(
    storage: Storage, mounted: bytes | None, *, replacing: bool = False
) -> None:
    """Refuse, before a command signs tokens or (``replacing``) replaces the secret, when the
    servers of this store use a mounted secret and the command has none (the tokens would be
    refused and the store's secret created for nothing); warn when the command's differs from
    theirs."""
    data = await storage.get(keys.TOKEN_SECRET_MOUNTED)
    if data is None:
        return
    try:
        recorded = str(json.loads(data)["fingerprint"])
    except (ValueError, KeyError, TypeError):
        recorded = ""
    if mounted is None and replacing:
        raise LarderError(
            "the servers of this store sign tokens with a mounted secret (token_secret_file): "
            "replace that secret where it comes from (e.g. its Kubernetes Secret), not here"
        )
    if mounted is None:
        raise LarderError(
            "the servers of this store sign tokens with a mounted secret: set token_secret_file "
            "(LARDER_TOKEN_SECRET_FILE) to a file holding that secret"
        )
    if fingerprint(mounted) != recorded:
        log.warning(
            "token_secret_file is not the secret the servers of this store started with "
            "(fingerprint %s, theirs %s): tokens made with it work only if they use it now",
            fingerprint(mounted),
            recorded or "unreadable",
        )


class TokenAuthority:
    """Issues and verifies tokens against the store's shared secret."""

    def __init__(
        self,
        storage: Storage,
        refresh_interval: float = 10.0,
        clock: Callable[[], float] = time.time,
        mounted: Callable[[], bytes] | None = None,
    ) -> None:
        self._storage = storage
        self._refresh = refresh_interval
        self._clock = clock
        self._mounted = mounted  # reads a mounted secret, which wins over the store's
        self._secret: bytes | None = None
        self._secret_at = float("-inf")
        self._secret_lock = asyncio.Lock()
        self._rechecked_at = float("-inf")  # when a bad signature last made it read the secret
        self._revoked: frozenset[str] = frozenset()
        self._revoked_at = float("-inf")
        self._lock = asyncio.Lock()
        self._verified: dict[str, TokenClaims] = {}

    async def secret(self, recheck: bool = False) -> bytes:
        """The shared HS256 secret, read again once older than ``refresh_interval`` (or now, to
        ``recheck`` it for a badly signed token).

        The store's is created on first use (one winner across replicas); a deleted one is
        created anew, which ends every token. A secret that changed forgets every token
        remembered under the old one. Once one was read, a failed re-read keeps it (and warns):
        an outage must not end every token."""
        age = 0.0 if recheck else self._refresh
        if self._secret is not None and time.monotonic() - self._secret_at < age:
            return self._secret
        async with self._secret_lock:
            if self._secret is None or time.monotonic() - self._secret_at >= age:
                try:
                    secret = await self._read_secret()
                except LarderError as exc:
                    if self._secret is None:
                        raise
                    if recheck:
                        # A read a bad signature asked for (as often as a forger sends them):
                        # no line each, and the scheduled re-read, which warns, stays due.
                        log.debug("token secret not read again: %s", exc.message)
                        return self._secret
                    log.warning("token secret not read again, kept as it was: %s", exc.message)
                    secret = self._secret
                if secret != self._secret:
                    self._verified.clear()
                    if self._mounted is not None and self._secret is not None:
                        await self._note_replaced(secret)
                self._secret, self._secret_at = secret, time.monotonic()
        return self._secret

    async def _note_replaced(self, mounted: bytes) -> None:
        """The mounted secret was replaced in place (a Secret updated): note the new one."""
        try:
            await record_secret_source(self._storage, mounted)
        except LarderError as exc:
            log.warning("cannot note the new token secret in the store: %s", exc.message)

    async def _read_secret(self) -> bytes:
        if self._mounted is not None:
            return self._mounted()
        data = await self._storage.get(keys.TOKEN_SECRET)
        if data is None:
            await self._storage.put_if_absent(keys.TOKEN_SECRET, secrets.token_hex(32).encode())
            data = await self._storage.get(keys.TOKEN_SECRET)
            if data is None:
                raise StorageError("token secret vanished after creation")
        try:
            return bytes.fromhex(data.decode().strip())
        except (UnicodeDecodeError, ValueError):
            raise StorageError("the stored token secret is not hex") from None

    async def replace_secret(self) -> None:
        """Store a new random secret: every token issued before it stops being accepted."""
        if self._mounted is not None:
            raise LarderError("the token secret is mounted (token_secret_file): replace that file")
        await self._storage.put(keys.TOKEN_SECRET, secrets.token_hex(32).encode())
        self._secret_at = float("-inf")

    async def issue(self, cache: str, scope: Scope, ttl_seconds: int) -> tuple[str, TokenClaims]:
        """A new token for ``cache`` (or ``*``); ``ttl_seconds == 0`` means no expiry."""
        now = int(self._clock())
        claims = TokenClaims(
            token_id=tokens.new_token_id(),
            cache=cache,
            scope=scope,
            expires_at=now + ttl_seconds if ttl_seconds else None,
            issued_at=now,
        )
        return tokens.issue(await self.secret(), claims), claims

    async def verify(self, token: str) -> TokenClaims:
        """The token's claims; :class:`Unauthorized` if it is malformed, expired or revoked.

        A token whose signature checked once is remembered (up to :data:`VERIFIED_TOKENS` of
        them): a client sends the same one with every request, and decoding it costs more than
        the rest of a small request's checks. Expiry and revocation are checked every time."""
        now = self._clock()
        secret = await self.secret()  # first: a replaced secret forgets remembered tokens
        claims = self._verified.get(token)
        if claims is None:
            claims = await self._signed(secret, token, now)
            if len(self._verified) >= VERIFIED_TOKENS:
                self._verified.clear()
            self._verified[token] = claims
        elif claims.expired(now):
            raise Unauthorized(f"invalid token: {expired_message(claims, now)}")
        if claims.token_id in await self._revoked_ids():
            raise Unauthorized("invalid token: revoked")
        return claims

    async def _signed(self, secret: bytes, token: str, now: float) -> TokenClaims:
        """The claims of ``token`` if ``secret`` signed it. A bad signature reads the secret
        again (unless another did less than :data:`SECRET_RECHECK` seconds ago) and tries the
        new one: a token made just after the secret was replaced elsewhere works at once, not a
        refresh later."""
        try:
            return tokens.verify(secret, token, now=now)
        except TokenError as exc:
            error = exc
        now_monotonic = time.monotonic()
        if (
            error.message.startswith("bad token signature")
            and now_monotonic - self._rechecked_at >= SECRET_RECHECK
        ):
            self._rechecked_at = now_monotonic
            newer = await self.secret(recheck=True)
            if newer != secret:
                try:
                    return tokens.verify(newer, token, now=now)
                except TokenError as exc:
                    error = exc
        raise Unauthorized(f"invalid token: {error.message}") from None

    async def revoke(self, token_id: str, reason: str = "") -> None:
        marker = json.dumps({"revoked_at": int(self._clock()), "reason": reason}).encode()
        await self._storage.put(keys.revoked(tokens.check_token_id(token_id)), marker)
        self._revoked_at = float("-inf")

    async def _revoked_ids(self) -> frozenset[str]:
        if time.monotonic() - self._revoked_at >= self._refresh:
            async with self._lock:
                if time.monotonic() - self._revoked_at >= self._refresh:
                    prefix = keys.REVOKED_PREFIX
                    ids = [key[len(prefix) :] async for key in self._storage.keys(prefix)]
                    self._revoked = frozenset(ids)
                    self._revoked_at = time.monotonic()
        return self._revoked
