"""Reading credentials off a request.

A token is accepted as ``Authorization: Bearer <token>`` or as the password of Basic auth with
any user name, which is how Nix sends netrc credentials; a request whose credentials are read
(not a public read) with more than one ``Authorization`` header is refused (400). The token
itself is never logged.
"""

from __future__ import annotations

import base64

from aiohttp import web

from larder.core.auth import TokenAuthority, authorize
from larder.core.caches import CacheSettings
from larder.errors import InvalidInput, LarderError, Unauthorized
from larder.protocol.tokens import Scope, TokenClaims
from larder.service.observability.roles import Roles


def token_from_request(request: web.Request) -> str | None:
    """The presented token, or ``None`` when the request carries no credentials."""
    headers = request.headers.getall("Authorization", [])
    if not headers:
        return None
    if len(headers) > 1:
        # A proxy in front may read another one than larder does: refuse to guess.
        raise InvalidInput("more than one Authorization header")
    return token_from_header(headers[0])


def token_from_header(header: str) -> str:
    """The token an ``Authorization`` value presents (:class:`Unauthorized` if none)."""
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return value
    if scheme.lower() == "basic" and value:
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except ValueError:  # binascii.Error, UnicodeDecodeError, and text that is not ASCII
            raise Unauthorized("malformed Basic credentials") from None
        _, sep, password = decoded.partition(":")
        if sep and password:
            return password
        raise Unauthorized(
            "Basic credentials without a password: the token is the password (netrc's "
            "password, SCCACHE_WEBDAV_PASSWORD), with any user name"
        )
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


async def could_write(
    authority: TokenAuthority, roles: Roles, header: str, cache: CacheSettings
) -> bool:
    """Whether the ``Authorization`` value ``header`` would let its request write to ``cache``:
    how lookups by CI (which pushes) are told from readers'. Remembered in ``roles`` (the short
    path and the application share it). Never raises: credentials that do not verify make a
    reader, as they do for a public read."""
    known = roles.writer(header, cache.name)
    if known is not None:
        return known
    try:
        authorize(await authority.verify(token_from_header(header)), cache, Scope.WRITE)
        writer = True
    except LarderError:
        writer = False
    roles.note(header, cache.name, writer)
    return writer
