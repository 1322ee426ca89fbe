"""Assembling the aiohttp application from a config and a storage backend."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from larder.core.auth import TokenAuthority
from larder.core.blobs import BlobStore
from larder.core.caches import CacheRegistry
from larder.core.nixcache import NixCache
from larder.core.rustc import RustcCache
from larder.core.sccache import SccacheStore
from larder.core.usage import usage
from larder.errors import LarderError
from larder.service import api_routes, nix_routes, observe, rustc_routes, state, webdav_routes
from larder.service.config import Config
from larder.service.errors import error_middleware
from larder.service.instrumented import InstrumentedStorage
from larder.service.workers import SharedWriteCounter, Worker
from larder.storage.base import Storage

log = logging.getLogger("larder")

# Threads that hash, (de)compress and write upload chunks; the libraries release the GIL.
UPLOAD_WORKERS = 8


def build_app(config: Config, storage: Storage, worker: Worker | None = None) -> web.Application:
    """The whole service. The app owns ``storage`` and closes it on cleanup.

    ``worker`` is set in each process of a multi-process server: metrics, served-narinfo misses
    and hit statistics are then shared with the other workers, and only worker 0 scans usage.
    """
    app = web.Application(middlewares=[error_middleware])
    metrics = observe.install(app, storage.backend, worker)
    storage = InstrumentedStorage(storage, metrics)
    executor = ThreadPoolExecutor(UPLOAD_WORKERS, thread_name_prefix="larder-io")
    app[state.CONFIG] = config
    app[state.STORAGE] = storage
    app[state.EXECUTOR] = executor
    app[state.CACHES] = CacheRegistry(storage, config.refresh_interval)
    app[state.TOKENS] = TokenAuthority(
        storage, config.refresh_interval, secret=config.token_secret()
    )
    app[state.BLOBS] = BlobStore(storage, executor)
    writes = SharedWriteCounter(worker) if worker is not None else None
    app[state.NIX] = NixCache(app[state.BLOBS], served_ttl=config.refresh_interval, writes=writes)
    app[state.RUSTC] = RustcCache(app[state.BLOBS])
    app[state.SCCACHE] = SccacheStore(app[state.BLOBS])

    async def resources(app: web.Application) -> AsyncIterator[None]:
        try:  # every existing cache's series start at 0; a cache created later gets them on use
            for cache in await app[state.CACHES].names():
                metrics.add_cache(cache)
        except LarderError as exc:
            log.warning("cannot list caches at start-up: %s", exc.message)
        scanner = None
        if config.usage_interval > 0 and (worker is None or worker.index == 0):
            scanner = asyncio.create_task(_scan_usage(app, config.usage_interval))
        yield
        if scanner is not None:
            scanner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scanner
        executor.shutdown(wait=True, cancel_futures=True)
        await storage.close()

    app.cleanup_ctx.append(resources)
    api_routes.add_routes(app)
    rustc_routes.add_routes(app)
    webdav_routes.add_routes(app)
    nix_routes.add_routes(app)  # last: it ends with a catch-all
    return app


async def _scan_usage(app: web.Application, interval: float) -> None:
    """Keep the storage gauges current: every cache, every ``interval`` seconds."""
    metrics = app[observe.METRICS]
    while True:
        try:
            for cache in await app[state.CACHES].names():
                metrics.add_cache(cache)
                for kind, (objects, size) in (await usage(app[state.STORAGE], cache)).items():
                    metrics.objects.labels(cache, kind).set(objects)
                    metrics.stored_bytes.labels(cache, kind).set(size)
        except LarderError as exc:
            log.warning("storage usage scan failed: %s", exc.message)
        await asyncio.sleep(interval)
