"""Counting what the service does: the metrics middleware, the hooks handlers call, ``/metrics``.

Handlers say what a request was (``note_cache`` from
:func:`~larder.service.routes.cache_access.cache_for`, ``note_lookup`` for a hit or a miss,
``note_upload`` for a write, ``note_writer`` for a request whose token could write to its cache);
the middleware turns that and the final status into series and into
the in-memory hit statistics. The protocol of a request is read from its route
(``/{cache}/rustc/...`` is ``rustc``), never from the raw path.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from larder.core.hitstats import HitStats
from larder.service.internals import ZeroCopyFileResponse
from larder.service.observability.answer_tally import AnswerTally
from larder.service.observability.metrics import (
    NO_CACHE,
    ROUTE_PROTOCOLS,
    STATUS_CLASS,
    UPLOAD_OUTCOMES,
    Metrics,
)
from larder.service.state import HITS, METRICS, TALLY

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


_CACHE = web.RequestKey("larder_cache", str)
_LOOKUP = web.RequestKey("larder_lookup", tuple)
_UPLOAD = web.RequestKey("larder_upload", bool)
_WRITER = web.RequestKey("larder_writer", bool)
_ERROR_CODE = web.RequestKey("larder_error_code", str)
WORKER_SCOPE = "the worker process of this replica that answered, since it started"


def protocol_of(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return _protocol_of_pattern(resource.canonical if resource is not None else "")


@functools.lru_cache(maxsize=256)
def _protocol_of_pattern(pattern: str) -> str:
    for prefix, protocol in ROUTE_PROTOCOLS:
        if pattern.startswith(prefix):
            return protocol
    return "other"


def note_cache(request: web.Request, cache: str) -> None:
    """The request names ``cache``, which exists (so it may be a label)."""
    request[_CACHE] = cache
    request.app[METRICS].add_cache(cache)


def note_lookup(request: web.Request, kind: str, hit: bool) -> None:
    request[_LOOKUP] = (kind, hit, writer(request))


def note_writer(request: web.Request) -> None:
    """The request's token could write to its cache: its lookups are a writer's (CI's)."""
    request[_WRITER] = True


def writer(request: web.Request) -> bool:
    """Whether :func:`note_writer` was said of the request: a writer's misses and crates are
    kept out of the hit statistics (``nix copy`` asks for every path it is about to push)."""
    return bool(request.get(_WRITER, False))


def note_miss_reason(request: web.Request, category: str) -> None:
    """A shim explained a rustc miss (``category`` is one of the fixed miss categories)."""
    metrics = request.app[METRICS]
    metrics.child(metrics.miss_reasons, request.get(_CACHE, NO_CACHE), category).inc()


def note_refused(request: web.Request, needed: str) -> None:
    """The request was refused for its token (it needed ``needed``) on the cache noted."""
    metrics = request.app[METRICS]
    cache = request.get(_CACHE, NO_CACHE)
    metrics.child(metrics.refused, cache, protocol_of(request), needed).inc()


def note_upload(request: web.Request) -> None:
    request[_UPLOAD] = True


def note_error_code(request: web.Request, code: str) -> None:
    request[_ERROR_CODE] = code


def _upload_outcome(request: web.Request, status: int) -> str:
    if status < 400:
        return "accepted"
    if status == 507:
        return "storage_full"
    if status >= 500:
        return "storage_error"
    by_status = {401: "unauthorized", 403: "forbidden", 413: "too_large"}
    code = request.get(_ERROR_CODE) or by_status.get(status, "other")
    return code if code in UPLOAD_OUTCOMES else "other"


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app[METRICS]
    metrics.in_flight.inc()
    start = time.monotonic()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        metrics.in_flight.dec()
        count_answer(
            request.app,
            request.get(_CACHE, NO_CACHE),
            protocol_of(request),
            status,
            time.monotonic() - start,
            received=request.content.total_bytes,
            upload=_upload_outcome(request, status) if request.get(_UPLOAD) else None,
            lookup=request.get(_LOOKUP),
        )


def count_answer(
    app: web.Application,
    cache: str,
    protocol: str,
    status: int,
    seconds: float,
    *,
    received: int = 0,
    upload: str | None = None,
    lookup: tuple[str, bool, bool] | None = None,
) -> None:
    """Count one answered request: its status and latency, body bytes received, the upload's
    outcome, and a lookup's hit or miss (``lookup``: kind, hit, by a writer), a reader's also in
    the hit statistics."""
    metrics = app[METRICS]
    metrics.child(metrics.latency, protocol).observe(seconds)
    metrics.child(metrics.requests, cache, protocol, STATUS_CLASS[min(status // 100, 5)]).inc()
    if received:
        metrics.child(metrics.received, cache, protocol).inc(received)
    if upload is not None:
        metrics.child(metrics.uploads, cache, protocol, upload).inc()
    if lookup is not None and cache != NO_CACHE:
        kind, hit, by_writer = lookup
        metrics.lookup(cache, protocol, kind, hit, writer=by_writer)
        if not by_writer:
            app[HITS].record(cache, protocol, hit)


def count_early_answer(request: web.Request, status: int, code: str, seconds: float) -> None:
    """An answer an ``expect_handler`` gave before the body (a refusal): aiohttp sends it without
    running any middleware, so it is counted here as :func:`metrics_middleware` counts the rest
    (the request's status, latency and upload outcome; its error ``code`` names the outcome)."""
    note_error_code(request, code)
    count_answer(
        request.app,
        request.get(_CACHE, NO_CACHE),
        protocol_of(request),
        status,
        seconds,
        upload=_upload_outcome(request, status) if request.get(_UPLOAD) else None,
    )


def count_unreadable(app: web.Application, status: int) -> None:
    """A request aiohttp refused before any handler saw it (a head it cannot parse): counted by
    status without a cache, and without a latency (it was never timed)."""
    metrics = app[METRICS]
    metrics.child(metrics.requests, NO_CACHE, "other", STATUS_CLASS[min(status // 100, 5)]).inc()


def count_sent_bytes(app: web.Application, cache: str, protocol: str, length: int) -> None:
    metrics = app[METRICS]
    metrics.child(metrics.sent, cache, protocol).inc(length)


async def count_sent(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: count the body's bytes as they go out, not its declared length
    (a client that reads 1 KB of a 60 MB download and leaves counts about what was written to
    its connection): each piece aiohttp's writer takes (its ``on_body_write``), and what a file
    response sent by ``sendfile``, past the writer, once the transfer ends."""
    if request.method == "HEAD":
        return
    metrics = request.app[METRICS]
    add = metrics.child(metrics.sent, request.get(_CACHE, NO_CACHE), protocol_of(request)).inc

    def written(size: int, _output_size: int) -> None:
        add(size)

    request.writer.on_body_write = written
    if isinstance(response, ZeroCopyFileResponse):
        response.on_body_sent = add


async def get_metrics(request: web.Request) -> web.Response:
    request.app[TALLY].flush()
    # On a thread: every cache has ~270 series, and 200 caches took 1.6 s to render, during
    # which the event loop answered nothing.
    body = await asyncio.to_thread(request.app[METRICS].render)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def install(app: web.Application, backend: str, multiprocess_dir: str | None = None) -> Metrics:
    """Create the registry and statistics, and hook them into ``app``; ``multiprocess_dir``:
    this process is one worker of several, which share their metrics there."""
    metrics = Metrics(backend, multiprocess_dir)
    app[METRICS] = metrics
    app[HITS] = HitStats() if multiprocess_dir is None else HitStats(scope=WORKER_SCOPE)
    app[TALLY] = AnswerTally(metrics, app[HITS])
    app.middlewares.insert(0, metrics_middleware)  # outermost: it sees the final status
    app.on_response_prepare.append(count_sent)
    app.router.add_get("/metrics", get_metrics)
    return metrics
