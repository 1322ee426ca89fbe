"""The private parts of aiohttp and prometheus-client that ``larder.service.internals`` reads
still have the name and meaning it relies on, for the versions ``pyproject.toml`` allows.

Raising a version cap in ``pyproject.toml`` means running this module against the new release
first; a failure here names the part that changed.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import tomllib
from importlib import metadata
from pathlib import Path

import aiohttp
import prometheus_client
from aiohttp import web
from aiohttp.test_utils import RawTestServer, TestClient
from prometheus_client import CollectorRegistry, Histogram

from larder.service import internals

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _cap(name: str) -> tuple[int, ...]:
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    spec = next(d for d in dependencies if d.startswith(name + ">"))
    match = re.search(r"<(\d+)\.(\d+)", spec)
    assert match is not None, f"{name} has no version cap: {spec}"
    return int(match.group(1)), int(match.group(2))


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in metadata.version(name).split(".")[:2])


def test_the_installed_versions_are_within_the_caps() -> None:
    assert _version("aiohttp") < _cap("aiohttp"), aiohttp.__version__
    assert _version("prometheus-client") < _cap("prometheus-client")
    assert prometheus_client is not None


async def test_the_handler_counts_parsed_requests_and_waits_for_the_next() -> None:
    seen: list[tuple[int, bool]] = []
    handlers: list[web.RequestHandler] = []

    async def handle(request: web.BaseRequest) -> web.Response:
        handler = request.protocol
        assert isinstance(handler, web.RequestHandler)
        handlers.append(handler)
        seen.append((internals.requests_parsed(handler), internals.waiting_for_request(handler)))
        return web.Response(text="ok")

    async with RawTestServer(handle) as test_server, TestClient(test_server) as client:
        for _ in range(2):  # one keep-alive connection
            assert (await client.get("/")).status == 200
        await asyncio.sleep(0.05)
        assert seen == [(1, False), (2, False)]  # while handling: parsed, not waiting
        assert len(set(map(id, handlers))) == 1
        assert internals.waiting_for_request(handlers[0])  # idle between requests
        assert internals.requests_parsed(handlers[0]) == 2


async def test_a_handler_is_made_with_the_servers_settings() -> None:
    async def handle(request: web.BaseRequest) -> web.Response:
        return web.Response()

    made: list[dict[str, object]] = []

    class Handler(web.RequestHandler):
        def __init__(self, manager: web.Server, **kwargs: object) -> None:
            made.append(kwargs)
            super().__init__(manager, **kwargs)  # type: ignore[arg-type]

    server = web.Server(handle, keepalive_timeout=12.5)
    handler = internals.make_handler(server, Handler)
    assert isinstance(handler, Handler)
    assert made[0]["keepalive_timeout"] == 12.5 and made[0]["loop"] is asyncio.get_running_loop()


async def test_the_runner_gives_its_settings_and_takes_the_server_made() -> None:
    remade: list[web.Server] = []

    def remake(server: web.Server) -> web.Server:
        remade.append(server)
        return server

    runner = internals.ServerMakingRunner(web.Application(), remake, keepalive_timeout=3.0)
    await runner.setup()
    try:
        assert remade == [runner.server]
        assert runner.settings["keepalive_timeout"] == 3.0
    finally:
        await runner.cleanup()


def test_the_file_response_sends_through_sendfile_hook() -> None:
    parameters = list(inspect.signature(web.FileResponse._sendfile).parameters)
    assert parameters == ["self", "request", "fobj", "offset", "count"]
    assert isinstance(web.StreamResponse.body_length, property)


def test_many_observations_at_once_equal_one_by_one() -> None:
    bounds = (0.1, 1.0)
    one, many = CollectorRegistry(), CollectorRegistry()
    first = Histogram("h", "h", buckets=bounds, registry=one)
    second = Histogram("h", "h", buckets=bounds, registry=many)
    for value in (0.05, 0.5, 0.7, 3.0):
        first.observe(value)
    internals.observe_many(second, [1, 2, 1], 4.25)

    def samples(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
        return [
            (s.name, s.labels, s.value)
            for metric in registry.collect()
            for s in metric.samples
            if not s.name.endswith("_created")
        ]

    assert samples(one) == samples(many)
