"""Reading credentials off a request.

A token is accepted as ``Authorization: Bearer <token>`` or as the password of Basic auth with
any user name, which is how Nix sends netrc credentials. The token itself is never logged.
"""

from __future__ import annotations

import base64
import binascii

from aiohttp import web

from larder.core.auth import TokenAuthority, authorize
from larder.core.caches import CacheSettings
from larder.errors import Unauthorized
from larder.protocol.tokens import Scope, TokenClaims


def token_from_request(request: web.Request) -> str | None:
    """The presented token, or ``None`` when the request carries no credentials."""
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return value
    if scheme.lower() == "basic" and value:
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise Unauthorized("malformed Basic credentials") from None
        _, sep, password = decoded.partition(":")
        if sep and password:
            return password
    raise Unauthorized("unsupported Authorization header: use Bearer or Basic")


async def check_access(
    request: web.Request, authority: TokenAuthority, cache: CacheSettings, needed: Scope
) -> TokenClaims | None:
    """Raise unless the request may do ``needed`` on ``cache``; return the verified claims.

    Public reads skip token verification entirely (a stale netrc entry must not break them).
    """
    if needed == Scope.READ and not cache.private:
        return None
    token = token_from_request(request)
    claims = await authority.verify(token) if token is not None else None
    authorize(claims, cache, needed)
    return claims
