"""Domain errors shared by every layer.

No layer below ``service/`` knows about HTTP: they raise these, and the service's error
middleware maps each class to a status in one table. A *miss* is never an error: lookups return
``None``.
"""

from __future__ import annotations


class LarderError(Exception):
    """Base class. ``code`` is a stable machine-readable identifier."""

    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(LarderError):
    """The request or an uploaded document is malformed (bad name, path, format)."""

    code = "invalid_input"


class FormatError(InvalidInput, ValueError):
    """A wire format (nix32, narinfo, NAR, key, token...) does not parse."""

    code = "bad_format"


class VerificationFailed(InvalidInput):
    """An upload parsed but failed a check (hash, size, missing reference...)."""

    code = "verification_failed"


class UnsupportedEncoding(InvalidInput):
    """A body arrived in a content coding larder cannot undo, or in one where none is allowed."""

    code = "unsupported_encoding"


class ClientGone(LarderError):
    """The client closed the connection before its request body was complete, or while its
    answer was being sent."""

    code = "client_closed_request"


class Conflict(LarderError):
    """The name is taken in a way the request cannot change (on disk storage, an entry's name
    used as a collection of other entries, or the reverse)."""

    code = "conflict"


class NoSuchCache(LarderError):
    """The named cache does not exist."""

    code = "no_such_cache"


class Unauthorized(LarderError):
    """No usable credentials were presented."""

    code = "unauthorized"


class Forbidden(LarderError):
    """Credentials were valid but do not allow this action on this cache."""

    code = "forbidden"


class TooLarge(LarderError):
    """A body exceeds the configured limit."""

    code = "too_large"


class ServerStopping(LarderError):
    """The server began to stop while the request's body was still arriving; sending it again
    (to this server once restarted, or to another replica) will be answered."""

    code = "server_stopping"


class Busy(LarderError):
    """The server is already doing as many of these at once as it may; asking again shortly
    will be answered."""

    code = "busy"


class TooSlow(LarderError):
    """The client stopped sending its body for longer than the idle limit."""

    code = "too_slow"


class StorageError(LarderError):
    """The storage backend failed in a way the client cannot fix."""

    code = "storage_error"


class StorageFull(StorageError):
    """The backend has no space left (disk full, quota exceeded)."""

    code = "storage_full"


class NoRoom(StorageFull):
    """An upload refused before its body, for want of room the backend reports (no write
    found the store full)."""


class StorageUnavailable(StorageError):
    """The backend cannot be reached right now; retrying later may succeed."""

    code = "storage_unavailable"
