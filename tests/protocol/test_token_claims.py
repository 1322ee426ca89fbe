"""Reading a token's own claims without the secret."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from larder.protocol import token_claims, tokens
from larder.protocol.tokens import Scope, TokenClaims

SECRET = bytes(range(32))


def token(scope: Scope, cache: str = "main") -> str:
    claims = TokenClaims("0123456789abcdef", cache, scope, None, 1_800_000_000)
    return tokens.issue(SECRET, claims)


def forged(payload: object) -> str:
    body = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()
    return f"eyJhbGciOiJIUzI1NiJ9.{body}.c2ln"


def test_claims_read_back_as_issued() -> None:
    claims = token_claims.unverified_claims(token(Scope.READ, "team"))
    assert claims is not None
    assert (claims["scope"], claims["cache"], claims["jti"]) == ("read", "team", "0123456789abcdef")


@pytest.mark.parametrize(
    ("scope", "cache", "url_cache", "expected"),
    [
        (Scope.READ, "main", "main", False),
        (Scope.READ, "*", "main", False),
        (Scope.WRITE, "main", "main", True),
        (Scope.ADMIN, "main", "main", True),
        (Scope.WRITE, "*", "team", True),
        (Scope.WRITE, "other", "main", False),
        (Scope.ADMIN, "other", "main", False),
    ],
)
def test_may_write(scope: Scope, cache: str, url_cache: str, expected: bool) -> None:
    assert token_claims.may_write(token(scope, cache), url_cache) is expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not-a-jwt",
        "a.b",
        "a.b.c.d",
        "x.!!!.y",
        "x.é.y",
        forged([1, 2]),
        forged("read"),
        "x." + "A" * 9000 + ".y",
        "x." + base64.urlsafe_b64encode(b"[" * 6000).decode() + ".y",  # nested past the limit
    ],
)
def test_unreadable_claims_are_left_to_the_server(text: str) -> None:
    assert token_claims.unverified_claims(text) is None
    assert token_claims.may_write(text, "main") is True


def test_odd_claims_only_refuse_what_they_clearly_say() -> None:
    assert token_claims.may_write(forged({"scope": 2, "cache": ["main"]}), "main") is True
    assert token_claims.may_write(forged({"scope": "READ"}), "main") is False
    assert token_claims.may_write(forged({"cache": "other"}), "main") is False


@given(st.text(max_size=200))
def test_never_raises(text: str) -> None:
    token_claims.may_write(text, "main")
