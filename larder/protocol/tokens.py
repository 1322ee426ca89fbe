"""larder's access tokens: HS256 JSON Web Tokens (RFC 7519) and their scopes.

Spec: RFC 7519 (JWT) with RFC 7518 section 3.2 (HS256), through PyJWT. A token's header is
``{"alg": "HS256", "typ": "JWT", "kid": <key id>}``; its claims are:

* ``jti``   token id, 16 to 64 lowercase hex characters (revocation is by id);
* ``cache`` the cache name it is valid for, or ``"*"`` for every cache;
* ``scope`` ``"read"``, ``"write"`` or ``"admin"`` (each implies the ones before it);
* ``iat``   issue time, integer Unix seconds;
* ``exp``   expiry, integer Unix seconds, absent when the token never expires.

Only HS256 is accepted (``alg: none`` and every other algorithm are rejected), the secret must
have at least 32 bytes (RFC 7518's minimum for HS256), and expiry is checked against the ``now``
the caller passes, never the wall clock: a token is expired from its ``exp`` second on.
:func:`verify` raises :class:`TokenError` whose message starts with ``token expired`` (with
its expiry and ``now``),
``bad token signature`` or ``malformed token``.

TTLs (:func:`parse_ttl`) are written ``<n>`` or ``<n>s`` (seconds), ``<n>m``, ``<n>h``, ``<n>d``,
``<n>w``; ``0`` (in any unit) and ``never`` mean no expiry and parse to 0.
"""

from __future__ import annotations

import enum
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, Final

import jwt

from larder.errors import FormatError
from larder.protocol.names import check_cache_name

ALGORITHM: Final = "HS256"
MIN_SECRET_LENGTH: Final = 32
MAX_TTL: Final = 100 * 366 * 86400

_TOKEN_ID = re.compile(r"[0-9a-f]{16,64}")
_TTL = re.compile(r"(0|[1-9][0-9]{0,12})([smhdw]?)")
_UNITS: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class TokenError(FormatError):
    """A token that cannot be used: malformed, wrongly signed or expired."""


class Scope(enum.IntEnum):
    """What a token allows; a higher scope includes the lower ones."""

    READ = 1
    WRITE = 2
    ADMIN = 3

    @classmethod
    def parse(cls, s: str) -> Scope:
        """``read``, ``write`` or ``admin`` (case-insensitive)."""
        try:
            return cls[s.strip().upper()]
        except KeyError:
            raise FormatError(f"invalid scope {s[:40]!r}: expected read, write or admin") from None

    def allows(self, needed: Scope) -> bool:
        return self >= needed

    def __str__(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class TokenClaims:
    """What a verified token says. ``expires_at`` is ``None`` for a token that never expires."""

    token_id: str
    cache: str
    scope: Scope
    expires_at: int | None
    issued_at: int

    def expired(self, now: float) -> bool:
        """Whether the token is past its expiry at time ``now``."""
        return self.expires_at is not None and now >= self.expires_at


def new_token_id() -> str:
    """A random token id: 16 lowercase hex characters (64 bits)."""
    return secrets.token_hex(8)


def check_token_id(token_id: str) -> str:
    """Return ``token_id`` if it is 16 to 64 lowercase hex characters, else raise FormatError."""
    if not _TOKEN_ID.fullmatch(token_id):
        raise FormatError(f"invalid token id {token_id[:80]!r}: expected 16-64 lowercase hex")
    return token_id


def _check_cache(cache: str) -> str:
    return cache if cache == "*" else check_cache_name(cache)


def _check_secret(secret: bytes) -> None:
    if len(secret) < MIN_SECRET_LENGTH:
        raise ValueError(f"the token secret must have at least {MIN_SECRET_LENGTH} bytes")


def issue(secret: bytes, claims: TokenClaims, key_id: str = "v1") -> str:
    """Sign ``claims`` into a token."""
    _check_secret(secret)
    check_token_id(claims.token_id)
    _check_cache(claims.cache)
    payload: dict[str, Any] = {
        "jti": claims.token_id,
        "cache": claims.cache,
        "scope": str(Scope(claims.scope)),
        "iat": int(claims.issued_at),
    }
    if claims.expires_at is not None:
        payload["exp"] = int(claims.expires_at)
    return jwt.encode(payload, secret, algorithm=ALGORITHM, headers={"kid": key_id})


def _check_ascii(token: str) -> None:
    # A JWT is base64url and dots; anything else (a header's undecodable bytes arrive as
    # surrogates) is not one, and PyJWT would fail to encode it rather than refuse it.
    if not token.isascii():
        raise TokenError("malformed token: not ASCII")


def unverified_key_id(token: str) -> str | None:
    """The ``kid`` header of a token, before verification (to choose the secret to verify with)."""
    _check_ascii(token)
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.InvalidTokenError:
        raise TokenError("malformed token") from None
    return kid if isinstance(kid, str) else None


def _int_claim(payload: dict[str, Any], name: str) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise TokenError(f"malformed token: claim {name} is not an integer")
    return value


def verify(secret: bytes, token: str, now: float) -> TokenClaims:
    """Check a token's signature and expiry at time ``now``; return its claims."""
    _check_secret(secret)
    _check_ascii(token)
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError:
        raise TokenError("malformed token") from None
    if header.get("alg") != ALGORITHM:
        raise TokenError(f"malformed token: algorithm {str(header.get('alg'))[:20]!r} not allowed")
    try:
        payload = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={
                "verify_signature": True,
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_aud": False,
                "verify_iss": False,
            },
        )
    except jwt.InvalidSignatureError:
        raise TokenError("bad token signature") from None
    except jwt.InvalidTokenError:
        raise TokenError("malformed token") from None
    if not isinstance(payload, dict):
        raise TokenError("malformed token: claims are not an object")
    token_id, cache, scope = payload.get("jti"), payload.get("cache"), payload.get("scope")
    issued_at = _int_claim(payload, "iat")
    expires_at = _int_claim(payload, "exp")
    if not isinstance(token_id, str) or not isinstance(cache, str) or not isinstance(scope, str):
        raise TokenError("malformed token: jti, cache and scope must be strings")
    if issued_at is None:
        raise TokenError("malformed token: no iat claim")
    try:
        claims = TokenClaims(
            token_id=check_token_id(token_id),
            cache=_check_cache(cache),
            scope=Scope.parse(scope),
            expires_at=expires_at,
            issued_at=issued_at,
        )
    except FormatError as exc:
        raise TokenError(f"malformed token: {exc.message}") from None
    if claims.expired(now):
        raise TokenError(expired_message(claims, now))
    return claims


def expired_message(claims: TokenClaims, now: float) -> str:
    """``token expired at <UTC time> (now <UTC time> by this server's clock)``: a token made on
    a host whose clock runs behind expires early, and the two times say so."""
    assert claims.expires_at is not None

    def utc(seconds: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))

    return f"token expired at {utc(claims.expires_at)} (now {utc(now)} by this server's clock)"


def parse_ttl(s: str) -> int:
    """Seconds in a TTL such as ``30d``, ``12h``, ``15m``, ``3600s`` or ``3600``; 0 = never."""
    text = s.strip().lower()
    if text == "never":
        return 0
    match = _TTL.fullmatch(text)
    if match is None:
        raise FormatError(
            f"invalid TTL {s[:40]!r}: expected <n>[s|m|h|d|w] (e.g. 30d, 12h) or 'never'"
        )
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds > MAX_TTL:
        raise FormatError(f"TTL {s[:40]!r} is longer than 100 years; use 'never' instead")
    return seconds
