"""A larder token's claims as its holder can read them: without the secret, so unverified.

A token (:mod:`larder.protocol.tokens`) is a JWT whose second dot-separated part is the
base64url-encoded JSON of its claims. A client reads its own token's ``scope`` and ``cache``
to skip what the server would refuse (uploads with a read token); nothing here grants
anything, and a token whose claims cannot be read is left for the server to judge. Kept apart
from :mod:`larder.protocol.tokens` so a client reads claims without loading a JWT library.
"""

from __future__ import annotations

import base64
import binascii
import json

_MAX_LENGTH = 8192
_WRITING_SCOPES = frozenset({"write", "admin"})


def unverified_claims(token: str) -> dict[str, object] | None:
    """The claims ``token`` carries, or None if it is not a JWT with a JSON object of claims."""
    parts = token.split(".")
    if len(token) > _MAX_LENGTH or len(parts) != 3 or not parts[1].isascii():
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError, RecursionError):  # RecursionError: nested too deep
        return None
    return claims if isinstance(claims, dict) else None


def may_write(token: str, cache: str) -> bool:
    """False when ``token`` says it cannot write to ``cache`` (a read scope, or another cache);
    True otherwise, unreadable claims included: the server decides those."""
    claims = unverified_claims(token)
    if claims is None:
        return True
    scope, claimed = claims.get("scope"), claims.get("cache")
    if isinstance(scope, str) and scope.lower() not in _WRITING_SCOPES:
        return False
    return not (isinstance(claimed, str) and claimed not in ("*", cache))
