"""Assembling the aiohttp application from a config and a storage backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from larder.core.auth import TokenAuthority
from larder.core.blobs import BlobStore
from larder.core.caches import CacheRegistry
from larder.core.nixcache import NixCache
from larder.core.rustc import RustcCache
from larder.core.sccache import SccacheStore
from larder.service import api_routes, nix_routes, rustc_routes, state, webdav_routes
from larder.service.config import Config
from larder.service.errors import error_middleware
from larder.storage.base import Storage

# Threads that hash, (de)compress and write upload chunks; the libraries release the GIL.
UPLOAD_WORKERS = 8


def build_app(config: Config, storage: Storage) -> web.Application:
    """The whole service. The app owns ``storage`` and closes it on cleanup."""
    app = web.Application(middlewares=[error_middleware])
    executor = ThreadPoolExecutor(UPLOAD_WORKERS, thread_name_prefix="larder-io")
    app[state.CONFIG] = config
    app[state.STORAGE] = storage
    app[state.EXECUTOR] = executor
    app[state.CACHES] = CacheRegistry(storage, config.refresh_interval)
    app[state.TOKENS] = TokenAuthority(storage, config.refresh_interval)
    app[state.BLOBS] = BlobStore(storage, executor)
    app[state.NIX] = NixCache(app[state.BLOBS])
    app[state.RUSTC] = RustcCache(app[state.BLOBS])
    app[state.SCCACHE] = SccacheStore(app[state.BLOBS])

    async def resources(app: web.Application) -> AsyncIterator[None]:
        yield
        executor.shutdown(wait=True, cancel_futures=True)
        await storage.close()

    app.cleanup_ctx.append(resources)
    api_routes.add_routes(app)
    rustc_routes.add_routes(app)
    webdav_routes.add_routes(app)
    nix_routes.add_routes(app)  # last: it ends with a catch-all
    return app
