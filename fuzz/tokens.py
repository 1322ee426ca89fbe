"""Fuzz target: the token parser (``larder.protocol.tokens``) that every request's credentials
go through, and the TTL, scope and token-id parsers of the CLI.

Input layout: byte 0 picks the mode. Even: the rest is a token as a client sends it. Odd: the
rest is ``<header JSON> NUL <claims JSON>``, signed here with the server's secret, so the claim
checks behind a valid signature are reached too.

Invariant: ``verify`` and ``unverified_key_id`` return or raise ``TokenError``; ``parse_ttl``,
``Scope.parse`` and ``check_token_id`` return or raise ``FormatError``; a token that verifies
has claims that pass the same checks ``issue`` applies.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac

from fuzz.common import instrumented, main, text

with instrumented():
    from larder.errors import FormatError
    from larder.protocol import tokens
    from larder.protocol.names import check_cache_name

SECRET = bytes(range(32))
NOW = 1_800_000_000


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def signed(header: bytes, claims: bytes) -> str:
    """A JWT of these raw header and claims bytes with a valid HS256 signature."""
    signing_input = _b64(header) + b"." + _b64(claims)
    signature = hmac.new(SECRET, signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + _b64(signature)).decode()


def one_input(data: bytes) -> None:
    if not data:
        return
    rest = data[1:]
    token = signed(*rest.partition(b"\0")[::2]) if data[0] & 1 else text(rest)
    try:
        claims = tokens.verify(SECRET, token, NOW)
    except tokens.TokenError:
        claims = None
    if claims is not None:
        tokens.check_token_id(claims.token_id)
        assert claims.cache == "*" or check_cache_name(claims.cache) == claims.cache
        assert claims.expires_at is None or claims.expires_at > NOW
        tokens.issue(SECRET, claims)  # what verified can be issued again
    with contextlib.suppress(tokens.TokenError):
        tokens.unverified_key_id(token)
    word = text(rest[:64])
    for parser in (tokens.parse_ttl, tokens.Scope.parse, tokens.check_token_id):
        with contextlib.suppress(FormatError):
            parser(word)


if __name__ == "__main__":
    main(one_input)
