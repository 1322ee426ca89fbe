"""Typed application state shared by the routes, the front and the observability hooks: every
``web.AppKey`` of the application, in one place."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from larder.core.auth import TokenAuthority
from larder.core.blobs import BlobStore
from larder.core.caches import CacheRegistry
from larder.core.gc.collector import Collector
from larder.core.hitstats import HitStats
from larder.core.lastuse import UseRecorder
from larder.core.nixcache import NixCache
from larder.core.rustc import RustcCache
from larder.core.sccache import SccacheStore
from larder.service.config import Config
from larder.service.observability.answer_tally import AnswerTally
from larder.service.observability.metrics import Metrics
from larder.service.observability.roles import Roles
from larder.storage.base import Storage

CONFIG = web.AppKey("config", Config)
STORAGE = web.AppKey("storage", Storage)
CACHES = web.AppKey("caches", CacheRegistry)
TOKENS = web.AppKey("tokens", TokenAuthority)
BLOBS = web.AppKey("blobs", BlobStore)
NIX = web.AppKey("nix", NixCache)
RUSTC = web.AppKey("rustc", RustcCache)
SCCACHE = web.AppKey("sccache", SccacheStore)
EXECUTOR = web.AppKey("executor", ThreadPoolExecutor)
RECORDER = web.AppKey("recorder", UseRecorder)
COLLECTOR = web.AppKey("collector", Collector)
METRICS = web.AppKey("metrics", Metrics)
HITS = web.AppKey("hits", HitStats)
TALLY = web.AppKey("tally", AnswerTally)
#: Which credentials could write to which cache, for the short path (:mod:`.observability.roles`).
ROLES = web.AppKey("roles", Roles)
#: Requests whose body is being read right now (stopped with 503 when the server stops).
READING = web.AppKey("reading", dict[int, web.Request])
#: Per cache: the large decoded downloads it may send at once (:mod:`.routes.bodies`).
DECODING = web.AppKey("decoding", dict[str, asyncio.Semaphore])
