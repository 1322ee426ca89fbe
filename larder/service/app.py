"""Assembling the aiohttp application from a config and a storage backend."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from larder.core.auth import TokenAuthority
from larder.core.blobs import BlobStore
from larder.core.caches import CacheRegistry
from larder.core.decoding import DecoderBudget
from larder.core.gc.collector import Collector
from larder.core.lastuse import UseRecorder
from larder.core.nixcache import NixCache
from larder.core.rustc import RustcCache
from larder.core.sccache import SccacheStore
from larder.errors import LarderError
from larder.service import housekeeping, state
from larder.service.cache_control import default_no_store
from larder.service.config import Config
from larder.service.errors import error_middleware
from larder.service.observability import recording
from larder.service.observability.instrumented_storage import InstrumentedStorage
from larder.service.observability.roles import Roles
from larder.service.routes import api, nix, rustc, webdav
from larder.service.workers import SharedWriteCounter, Worker
from larder.storage.base import Storage

log = logging.getLogger("larder")

# Threads that hash, (de)compress and write upload chunks; the libraries release the GIL.
UPLOAD_WORKERS = 8
#: Memory the decoders of all uploads of one process may hold together (larder.core.decoding):
#: a zstd frame may ask for a 128 MiB window and an xz stream for a 128 MiB dictionary, while
#: what Nix writes by default needs at most 8 MiB (zstd levels up to 19, xz preset 6). An
#: upload that does not fit waits for others to end, up to body_idle_timeout (the time a body
#: may pause anyway), then is answered 503: Nix 2.8 sends a PUT again without its body, so a
#: 503 fails its push, while waiting holds only the upload's next chunk.
UPLOAD_DECODER_MEMORY = 512 * 1024 * 1024
#: How long an upload waits for decoder memory; None: body_idle_timeout.
DECODER_WAIT: float | None = None


def build_app(config: Config, storage: Storage, worker: Worker | None = None) -> web.Application:
    """The whole service. The app owns ``storage`` and closes it on cleanup.

    ``worker`` is set in each process of a multi-process server: metrics, served-narinfo misses
    and hit statistics are then shared with the other workers, and only worker 0 scans usage
    and runs garbage collections.
    """
    # Bodies reach the routes as sent: the Nix routes undo every coding Nix uses themselves
    # (aiohttp would undo gzip and deflate only, and keep the header), the others refuse one.
    app = web.Application(middlewares=[error_middleware], handler_args={"auto_decompress": False})
    app.on_response_prepare.append(default_no_store)  # what proxies may keep: cache_control
    metrics = recording.install(
        app, storage.backend, str(worker.metrics_dir) if worker is not None else None
    )
    storage = InstrumentedStorage(storage, metrics)
    executor = ThreadPoolExecutor(UPLOAD_WORKERS, thread_name_prefix="larder-io")
    app[state.CONFIG] = config
    app[state.READING] = {}
    app[state.DECODING] = {}
    app[state.STORAGE] = storage
    app[state.EXECUTOR] = executor
    app[state.CACHES] = CacheRegistry(storage, config.refresh_interval)
    app[state.ROLES] = Roles(config.refresh_interval)
    app[state.TOKENS] = TokenAuthority(
        storage, config.refresh_interval, mounted=config.mounted_token_secret()
    )
    wait = config.body_idle_timeout if DECODER_WAIT is None else DECODER_WAIT
    decoders = DecoderBudget(
        UPLOAD_DECODER_MEMORY,
        wait=wait,
        observe=metrics.decoder_memory.set,
        waited=metrics.decoder_waits.inc,
    )
    app[state.BLOBS] = BlobStore(storage, executor, decoders)
    writes = SharedWriteCounter(worker) if worker is not None else None
    recorder = app[state.RECORDER] = UseRecorder(storage)
    touch = recorder.touch
    app[state.NIX] = NixCache(
        app[state.BLOBS],
        served_ttl=config.refresh_interval,
        writes=writes,
        touch=touch,
        max_nar_size=config.max_nar_size,
    )
    app[state.RUSTC] = RustcCache(app[state.BLOBS], touch=touch)
    app[state.SCCACHE] = SccacheStore(app[state.BLOBS], touch=touch)
    app[state.COLLECTOR] = Collector(storage, recorder=recorder, forget=app[state.NIX].forget)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        try:  # every existing cache's series start at 0; a later one's: housekeeping, or its use
            for cache in await app[state.CACHES].names():
                metrics.add_cache(cache)
        except LarderError as exc:
            log.warning("cannot list caches at start-up: %s", exc.message)
        # Every worker writes the uses it recorded; only the first scans usage and collects.
        background = housekeeping.start(app, scans=worker is None or worker.index == 0)
        yield
        await housekeeping.stop(app, background)
        await app[state.NIX].close()
        executor.shutdown(wait=True, cancel_futures=True)
        await storage.close()

    app.cleanup_ctx.append(resources)
    api.add_routes(app)
    rustc.add_routes(app)
    webdav.add_routes(app)
    nix.add_routes(app)  # last: it ends with a catch-all
    return app
