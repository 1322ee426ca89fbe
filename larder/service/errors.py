"""The one table that turns domain errors into HTTP responses.

Bodies are JSON ``{"code", "error", "message"}`` on ``/api/`` routes and plain text elsewhere
(Nix prints a failed upload's response body, so the text says which check failed). Internal
errors are logged with their details and answered with a generic message.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from larder import errors
from larder.service.front.heads import valid_host
from larder.service.observability.recording import note_error_code
from larder.service.state import STORAGE

log = logging.getLogger("larder.http")

#: ``Retry-After`` of every 503 (storage unreachable, too many connections).
RETRY_AFTER_SECONDS = 1

# Most specific class first: the first isinstance match wins.
STATUS_TABLE: tuple[tuple[type[errors.LarderError], int], ...] = (
    (errors.StorageFull, 507),
    (errors.StorageUnavailable, 503),
    (errors.ServerStopping, 503),
    (errors.Busy, 503),
    (errors.StorageError, 500),
    (errors.TooLarge, 413),
    (errors.TooSlow, 408),
    (errors.Unauthorized, 401),
    (errors.Forbidden, 403),
    (errors.NoSuchCache, 404),
    (errors.Conflict, 409),
    # Not an HTTP status any client sees (it has gone): nginx's 499 keeps such uploads out of
    # the 5xx counts and alerts, and off the error log.
    (errors.ClientGone, 499),
    (errors.UnsupportedEncoding, 415),
    (errors.InvalidInput, 400),
)


def status_for(exc: errors.LarderError) -> int:
    for cls, status in STATUS_TABLE:
        if isinstance(exc, cls):
            return status
    return 500


def error_response(request: web.Request, status: int, code: str, message: str) -> web.Response:
    headers: dict[str, str] = {}
    if status == 503:
        headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    if status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="larder"'
    if request.path.startswith("/api/"):
        body = json.dumps({"code": status, "error": code, "message": message})
        return web.Response(
            status=status, text=body, content_type="application/json", headers=headers
        )
    return web.Response(status=status, text=message + "\n", headers=headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _escaped(text: str) -> str:
    """``text`` with control characters escaped (``\\n``, ``\\x1b``...): what a client sent
    (a path is percent-decoded) must not start a line of its own in the log."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _path(request: web.Request) -> str:
    return _escaped(request.path)


def _unreadable_request(request: web.Request) -> tuple[str, str] | None:
    """``(code, message)`` when the request cannot be taken as it is, whatever the route: then
    it is refused with 400 before any route reads it.

    - A ``Host`` that is no host (RFC 9112 §3.2: 400): ``a b``, ``x"<y``, ``[::1``, a port past
      65535. The API would have written it into the substituter URL it answers.

    - A transfer coding other than ``chunked``: aiohttp reads ``gzip, chunked`` as plain chunked
      and would hand over the coded bytes. (RFC 9112 suggests 501; 400 as aiohttp answers a
      ``Transfer-Encoding`` it cannot read, since a request anyone can send must not count as a
      server error.)
    - ``Content-Range`` on a write: a part of a resource stored as the whole of it. RFC 9110
      §14.5: a server that does not take partial ``PUT`` must answer 400.
    """
    host = request.headers.get("Host")
    if host is not None and not valid_host(host.encode("utf-8", "surrogateescape")):
        return "invalid_host", "the Host header is not a host name or address with a port"
    value = request.headers.get("Transfer-Encoding")
    if value is not None:
        codings = [coding.strip().lower() for coding in value.split(",")]
        unknown = [coding for coding in codings if coding != "chunked"]
        if unknown:
            return "transfer_coding", (
                f"transfer coding {unknown[0][:40]!r} is not supported; "
                "send the body chunked or sized"
            )
    if "Content-Range" in request.headers and request.method in ("PUT", "POST", "PATCH"):
        return "partial_write", "partial writes (Content-Range) are not supported; send it whole"
    return None


#: Seconds between errors logged for a full store; the refusals in between are logged at info.
FULL_LOG_INTERVAL = 60.0
_full_logged = [-FULL_LOG_INTERVAL]  # when the last one was, on the monotonic clock


def _quiet_full(exc: errors.LarderError) -> bool:
    """Whether ``exc`` is a full store's, within :data:`FULL_LOG_INTERVAL` of the last one
    logged as an error: every upload (and Nix's retries of each) is refused while it lasts."""
    if not isinstance(exc, errors.StorageFull):
        return False
    now = time.monotonic()
    if now - _full_logged[0] < FULL_LOG_INTERVAL:
        return True
    _full_logged[0] = now
    return False


async def _note_full(request: web.Request) -> None:
    """Tell the store a write found it full (:func:`.routes.bodies.check_room` reads it)."""
    try:
        await request.app[STORAGE].note_full()
    except errors.LarderError as exc:
        log.info("could not note the full store: %s", exc.message)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    refusal = _unreadable_request(request)
    if refusal is not None:
        code, message = refusal
        log.info("%s %s refused (400): %s", request.method, _path(request), message)
        response = error_response(request, 400, code, message)
        response.force_close()  # the body was not read
        return response
    try:
        return await handler(request)
    except errors.LarderError as exc:
        note_error_code(request, exc.code)
        status = status_for(exc)
        # A server error of larder's own (a stop is not: the client sends its upload again;
        # nor is shedding load: the client asks again)
        internal = status >= 500 and not isinstance(exc, errors.ServerStopping | errors.Busy)
        if internal and not _quiet_full(exc):
            log.error("%s %s failed: %s", request.method, _path(request), _escaped(exc.message))
        else:
            path, message = _path(request), _escaped(exc.message)
            log.info("%s %s refused (%d): %s", request.method, path, status, message)
        # A storage error's own message names the backend (an S3 endpoint, a bucket, a key,
        # a local path): clients get its kind, the log gets the details.
        if isinstance(exc, errors.StorageFull):
            if not isinstance(exc, errors.NoRoom):  # a write found it full, all workers know
                await _note_full(request)
            message = "storage is full"
        elif isinstance(exc, errors.StorageUnavailable):
            message = "storage is unavailable; retry later"
        elif internal:
            message = "internal storage error"
        else:
            message = exc.message
        return error_response(request, status, exc.code, message)
    except web.HTTPException as exc:
        if exc.status >= 400 and request.path.startswith("/api/"):
            response = error_response(request, exc.status, "http_error", exc.reason)
            if "Allow" in exc.headers:  # a 405 must say what is allowed (RFC 9110 §15.5.6)
                response.headers["Allow"] = exc.headers["Allow"]
            return response
        raise
    except Exception:
        log.exception("%s %s crashed", request.method, _path(request))
        return error_response(request, 500, "internal", "internal error")
