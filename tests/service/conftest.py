"""An in-process larder (memory storage) behind a real aiohttp test server."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp.test_utils import TestClient

from larder.core.caches import CacheSettings
from larder.errors import StorageUnavailable
from larder.protocol.tokens import Scope
from larder.service import state
from larder.service.app import build_app
from larder.service.config import Config
from larder.service.observability.access_log import LineSink
from larder.service.server import Running, start
from larder.storage.base import Storage
from larder.storage.memory import MemoryStorage


@dataclass
class Service:
    client: TestClient  # type: ignore[type-arg]
    storage: Storage
    main: CacheSettings
    write_token: str
    tokens: dict[str, str] = field(default_factory=dict)

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.write_token}"}

    def basic(self, token: str | None = None) -> dict[str, str]:
        credentials = f"nix:{token or self.write_token}".encode()
        return {"Authorization": "Basic " + base64.b64encode(credentials).decode()}

    async def issue(self, cache: str, scope: Scope, ttl: int = 3600) -> str:
        token, _ = await self.client.app[state.TOKENS].issue(cache, scope, ttl)
        return token


ServiceFactory = Callable[..., Awaitable[Service]]


def capturing_logger(name: str) -> tuple[logging.Logger, list[str]]:
    """A logger at INFO that keeps the messages of its records in the returned list."""
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger(name)
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger, messages


async def send_raw(service: Service, head: str, body: bytes = b"") -> int:
    """Send a request head (request line and headers, each ending in CRLF) and ``body`` byte for
    byte, with no client-side path normalisation; the response status."""
    reader, writer = await asyncio.open_connection(service.client.host, service.client.port)
    writer.write(f"{head}Host: x\r\nConnection: close\r\n\r\n".encode() + body)
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    return int(line.split()[1])


@pytest.fixture
def make_service(aiohttp_client: Callable[..., Awaitable[TestClient]]) -> ServiceFactory:  # type: ignore[type-arg]
    async def factory(storage: Storage | None = None, **config: object) -> Service:
        storage = storage or MemoryStorage()
        app = build_app(Config(**config), storage)  # type: ignore[arg-type]
        client = await aiohttp_client(app)
        main, _ = await app[state.CACHES].ensure("main")
        token, _ = await app[state.TOKENS].issue("main", Scope.WRITE, 3600)
        return Service(client, storage, main, token)

    return factory


@pytest.fixture
async def service(make_service: ServiceFactory) -> Service:
    return await make_service()


# -- a real server on a socket, with the short path in front (test_fastpath*.py) ---------


@dataclass
class Live:
    running: Running
    port: int
    main: CacheSettings
    token: str
    log: io.StringIO
    sink: LineSink

    @property
    def app(self):  # type: ignore[no-untyped-def]
        return self.running.runner.app


class Flaky(MemoryStorage):
    """Memory storage whose narinfo reads fail while ``down`` is set."""

    down = False
    delay = 0.0

    async def get(self, key: str) -> bytes | None:
        if self.down and "/narinfo/" in key:
            raise StorageUnavailable("bucket unreachable")
        if self.delay and "/narinfo/" in key:
            await asyncio.sleep(self.delay)
        return await super().get(key)


@pytest.fixture
def config() -> Config:
    return Config()


@pytest.fixture
def storage() -> Storage:
    return Flaky()


@pytest.fixture
def sndbuf() -> int:
    """The served connections' socket send buffer (``SO_SNDBUF``); 0: the system's."""
    return 0


@pytest.fixture
async def live(config: Config, storage: Storage, sndbuf: int) -> AsyncIterator[Live]:
    access = logging.getLogger("aiohttp.access")
    level = access.level
    access.setLevel(logging.INFO)  # as `larder serve` configures it (log_level = info)
    app = build_app(config, storage)
    sock = socket.socket()
    if sndbuf:  # accepted connections inherit it
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    log = io.StringIO()
    sink = LineSink(log)
    running = await start(config, app, sock, sink)
    main, _ = await app[state.CACHES].ensure("main")
    token, _ = await app[state.TOKENS].issue("*", Scope.ADMIN, 3600)
    try:
        yield Live(running, sock.getsockname()[1], main, token, log, sink)
    finally:
        await running.stop()
        access.setLevel(level)
