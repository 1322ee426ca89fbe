"""Access tokens: HS256 JWTs with explicit time, scopes and TTLs."""

from __future__ import annotations

import base64
import contextlib
import json
import re

import jwt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from larder.errors import FormatError
from larder.protocol import tokens
from larder.protocol.tokens import Scope, TokenClaims, TokenError

SECRET = bytes(range(32))
OTHER = bytes(range(1, 33))
NOW = 1_800_000_000


def claims(**changes: object) -> TokenClaims:
    base: dict[str, object] = {
        "token_id": "0123456789abcdef",
        "cache": "main",
        "scope": Scope.WRITE,
        "expires_at": NOW + 3600,
        "issued_at": NOW,
    }
    base.update(changes)
    return TokenClaims(**base)  # type: ignore[arg-type]


def test_issue_and_verify() -> None:
    token = tokens.issue(SECRET, claims())
    assert tokens.verify(SECRET, token, now=NOW) == claims()
    assert tokens.verify(SECRET, token, now=NOW + 3599.9) == claims()
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "HS256", "typ": "JWT", "kid": "v1"}
    assert tokens.unverified_key_id(token) == "v1"
    assert tokens.unverified_key_id(tokens.issue(SECRET, claims(), key_id="k2")) == "k2"


def test_payload_layout() -> None:
    token = tokens.issue(SECRET, claims(cache="*", scope=Scope.ADMIN, expires_at=None))
    payload = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_iat": False})
    assert payload == {"jti": "0123456789abcdef", "cache": "*", "scope": "admin", "iat": NOW}
    assert tokens.verify(SECRET, token, now=NOW + 10**9).expires_at is None


def test_expiry_uses_the_given_time_not_the_clock() -> None:
    past = claims(issued_at=1000, expires_at=2000)
    token = tokens.issue(SECRET, past)
    assert tokens.verify(SECRET, token, now=1999) == past
    for now in (2000, 2000.5, NOW):
        with pytest.raises(TokenError, match=r"^token expired at 1970-01-01T00:33:20Z \(now "):
            tokens.verify(SECRET, token, now=now)
    future = claims(issued_at=NOW * 2, expires_at=NOW * 2 + 10)
    assert tokens.verify(SECRET, tokens.issue(SECRET, future), now=NOW * 2) == future


def test_already_expired_tokens_can_be_issued() -> None:
    token = tokens.issue(SECRET, claims(expires_at=NOW - 10))
    with pytest.raises(TokenError, match="token expired"):
        tokens.verify(SECRET, token, now=NOW)


def _b64(obj: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def forged(header: dict[str, object], payload: dict[str, object], secret: bytes = SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256", headers=header)


GOOD_PAYLOAD = {"jti": "0123456789abcdef", "cache": "main", "scope": "read", "iat": NOW}


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (tokens.issue(OTHER, claims()), "bad token signature"),
        (tokens.issue(SECRET, claims())[:-2] + "AA", "bad token signature"),
        ("", "malformed token"),
        ("abc", "malformed token"),
        ("a.b.c", "malformed token"),
        ("Bearer " + tokens.issue(SECRET, claims()), "malformed token"),
        (_b64({"alg": "none", "typ": "JWT"}) + "." + _b64(GOOD_PAYLOAD) + ".", "malformed token"),
        (
            jwt.encode(GOOD_PAYLOAD, SECRET * 2, algorithm="HS512"),
            "malformed token: algorithm 'HS512'",
        ),
        (jwt.encode(GOOD_PAYLOAD, SECRET * 2, algorithm="HS384"), "malformed token: algorithm"),
        (forged({}, {**GOOD_PAYLOAD, "scope": "root"}), "malformed token: invalid scope 'root'"),
        (forged({}, {**GOOD_PAYLOAD, "cache": "API"}), "malformed token: invalid cache name"),
        (forged({}, {**GOOD_PAYLOAD, "cache": "api"}), "malformed token: invalid cache name"),
        (forged({}, {**GOOD_PAYLOAD, "jti": "../../etc"}), "malformed token: invalid token id"),
        (forged({}, {**GOOD_PAYLOAD, "jti": 5}), "malformed token"),
        (forged({}, {**GOOD_PAYLOAD, "cache": 5}), "malformed token: jti, cache and scope must be"),
        (
            forged({}, {k: v for k, v in GOOD_PAYLOAD.items() if k != "iat"}),
            "malformed token: no iat",
        ),
        (forged({}, {**GOOD_PAYLOAD, "iat": "now"}), "malformed token"),
        (forged({}, {**GOOD_PAYLOAD, "exp": True}), "malformed token"),
        (forged({}, {**GOOD_PAYLOAD, "exp": 1.5}), "malformed token"),
        (
            forged({}, {k: v for k, v in GOOD_PAYLOAD.items() if k != "scope"}),
            "malformed token: jti",
        ),
    ],
)
def test_rejected_tokens(token: str, message: str) -> None:
    with pytest.raises(TokenError, match="^" + re.escape(message)):
        tokens.verify(SECRET, token, now=NOW)


@pytest.mark.parametrize("token", ["\udcff\udcfe.a.b", "é.b.c", "0123\udcff"])
def test_non_ascii_tokens_are_malformed_not_a_crash(token: str) -> None:
    # A Bearer header's undecodable bytes reach verify as surrogates (found by fuzz.tokens).
    with pytest.raises(TokenError, match=r"^malformed token"):
        tokens.verify(SECRET, token, now=NOW)
    with pytest.raises(TokenError, match=r"^malformed token"):
        tokens.unverified_key_id(token)


def test_token_error_is_a_format_error() -> None:
    assert issubclass(TokenError, FormatError)


def test_short_secrets_are_refused() -> None:
    """HS256 with a secret shorter than its 32-byte hash is weaker than it should be: one byte
    short is refused as surely as five bytes."""
    for short in (b"short", SECRET[:31]):
        with pytest.raises(ValueError, match="at least 32 bytes"):
            tokens.issue(short, claims())
        with pytest.raises(ValueError, match="at least 32 bytes"):
            tokens.verify(short, "x.y.z", now=NOW)


def test_issue_validates_claims() -> None:
    with pytest.raises(FormatError, match="invalid token id"):
        tokens.issue(SECRET, claims(token_id="xyz"))
    with pytest.raises(FormatError, match="invalid cache name"):
        tokens.issue(SECRET, claims(cache="Main"))


def test_token_ids() -> None:
    ids = {tokens.new_token_id() for _ in range(100)}
    assert len(ids) == 100
    for token_id in ids:
        assert tokens.check_token_id(token_id) == token_id and len(token_id) == 16
    for bad in ("", "abc", "0123456789ABCDEF", "0123456789abcdeg", "0" * 65, "../0123456789abcd"):
        with pytest.raises(FormatError, match="invalid token id"):
            tokens.check_token_id(bad)


def test_scopes() -> None:
    assert [Scope.parse(s) for s in ("read", "WRITE", " admin ")] == [
        Scope.READ,
        Scope.WRITE,
        Scope.ADMIN,
    ]
    assert Scope.ADMIN.allows(Scope.WRITE) and Scope.WRITE.allows(Scope.READ)
    assert not Scope.READ.allows(Scope.WRITE)
    assert Scope.READ < Scope.WRITE < Scope.ADMIN
    assert str(Scope.WRITE) == "write"
    for bad in ("", "root", "1", "readwrite"):
        with pytest.raises(FormatError, match="invalid scope"):
            Scope.parse(bad)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30d", 30 * 86400),
        ("12h", 12 * 3600),
        ("15m", 900),
        ("3600s", 3600),
        ("3600", 3600),
        ("2w", 14 * 86400),
        ("0", 0),
        ("0d", 0),
        ("never", 0),
        (" NEVER ", 0),
        ("1H", 3600),
    ],
)
def test_parse_ttl(text: str, seconds: int) -> None:
    assert tokens.parse_ttl(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "d", "-1", "+5", "1.5h", "5y", "10 d", "01d", "1e3", "٣", "1_000", "99999999999d"]
)
def test_parse_ttl_rejects(text: str) -> None:
    with pytest.raises(FormatError, match="TTL"):
        tokens.parse_ttl(text)


@given(
    token_id=st.from_regex(r"[0-9a-f]{16,64}", fullmatch=True),
    cache=st.one_of(st.just("*"), st.from_regex(r"[a-z0-9][a-z0-9_-]{0,62}", fullmatch=True)),
    scope=st.sampled_from(Scope),
    issued_at=st.integers(0, 2**40),
    ttl=st.none() | st.integers(1, 2**31),
)
def test_round_trip(
    token_id: str, cache: str, scope: Scope, issued_at: int, ttl: int | None
) -> None:
    if cache in ("api", "healthz", "readyz", "metrics", "static"):
        cache = "*"
    value = TokenClaims(token_id, cache, scope, None if ttl is None else issued_at + ttl, issued_at)
    assert tokens.verify(SECRET, tokens.issue(SECRET, value), now=issued_at) == value


@given(st.text(max_size=200))
def test_verify_never_crashes(text: str) -> None:
    with contextlib.suppress(TokenError):
        tokens.verify(SECRET, text, now=NOW)
