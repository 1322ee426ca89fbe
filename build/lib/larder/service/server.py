"""Running ``larder serve``: one process, or a supervisor and ``workers`` worker processes.

With ``workers = 1`` (the default) the process that was started serves. With more, it binds the
listening socket, runs the start-up work once (creating cache ``main``, adopting signing keys),
lays out a shared directory (:mod:`larder.service.workers`) and starts that many fresh
interpreters (``python -m larder.service.server``) that inherit the socket and accept on it.
It restarts a worker that dies (and gives up, stopping the rest, if one dies within
:data:`MIN_UPTIME` seconds of its start), stops them all on SIGTERM or SIGINT, and removes the
shared directory at the end. A worker whose supervisor is gone stops by itself.

Each process runs its event loop on uvloop unless ``event_loop = "asyncio"``, writes its access log
through :class:`~larder.service.observability.access_log.LineSink`, and starts every connection with
:class:`~larder.service.front.connection.FrontProtocol`, which answers public narinfo GETs itself
and hands everything else to the aiohttp application.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from aiohttp import web

from larder.service import workers as shared
from larder.service.app import build_app
from larder.service.config import Config
from larder.service.front.connection import FrontProtocol
from larder.service.front.limits import (
    KEEPALIVE_TIMEOUT,
    ConnectionGuard,
    GuardedAppRunner,
    Sweeper,
    raise_open_file_limit,
)
from larder.service.front.short_path import AccessLog, FastPath
from larder.service.observability.access_log import JsonAccessLogger, LineSink, TextAccessLogger
from larder.storage.base import Storage
from larder.storage.factory import open_storage

log = logging.getLogger("larder")

Bootstrap = Callable[[Config, Storage], Awaitable[None]]

MIN_UPTIME = 5.0
STOP_TIMEOUT = 30.0
BACKLOG = 1024
PARENT_CHECK = 1.0
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def worker_count(config: Config) -> int:
    """``workers``, with 0 meaning one per CPU this process may run on."""
    if config.workers:
        return config.workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def new_event_loop(config: Config) -> asyncio.AbstractEventLoop:
    if config.event_loop == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def serve(config: Config, bootstrap: Bootstrap) -> int:
    """Serve until SIGTERM or SIGINT; the exit status."""
    count = worker_count(config)
    if count == 1:
        raise_open_file_limit(config.max_connections)
        storage = open_storage(config.storage, zstd_level=config.zstd_level)
        app = build_app(config, storage)

        async def on_startup(app: web.Application) -> None:
            await bootstrap(config, storage)

        app.on_startup.append(on_startup)
        _run(config, app, _listen(config))
        return 0
    return _supervise(config, count, bootstrap)


def _run(config: Config, app: web.Application, sock: socket.socket) -> None:
    """Serve ``app`` on ``sock`` until SIGTERM or SIGINT, then shut down gracefully."""
    sink = LineSink(sys.stderr)
    loop = new_event_loop(config)
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(_serve_app(config, app, sock, sink))
    finally:
        sink.flush()
        loop.run_until_complete(loop.shutdown_asyncgens())
        asyncio.set_event_loop(None)
        loop.close()


async def _serve_app(
    config: Config, app: web.Application, sock: socket.socket, sink: LineSink
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    running = await start(config, app, sock, sink)
    try:
        await stop.wait()
    finally:
        await running.stop()


@dataclass
class Running:
    """An application accepting on a socket (what :func:`start` returns)."""

    runner: web.AppRunner
    listener: asyncio.AbstractServer
    #: Connections still with :class:`FrontProtocol` (not handed to aiohttp yet).
    front: set[FrontProtocol]
    fast: FastPath
    sweeper: Sweeper

    async def stop(self) -> None:
        self.listener.close()
        self.sweeper.stop()
        for connection in list(self.front):
            connection.close()
        self.fast.flush()
        await self.runner.cleanup()


async def start(
    config: Config, app: web.Application, sock: socket.socket, sink: LineSink
) -> Running:
    """Start ``app`` (its start-up hooks run now) on the listening ``sock``."""
    logger = JsonAccessLogger if config.access_log == "json" else TextAccessLogger
    guard = ConnectionGuard(config.header_timeout, config.max_connections)
    runner = GuardedAppRunner(
        app,
        guard,
        access_log_class=logger.writing_to(sink),
        keepalive_timeout=KEEPALIVE_TIMEOUT,
        auto_decompress=False,  # as the application asks (build_app): its server is remade here
    )
    await runner.setup()
    server = runner.server
    assert server is not None
    access = None
    if logging.getLogger("aiohttp.access").isEnabledFor(logging.INFO):
        access = AccessLog(logger.get_line, sink.emit, logger.timed)
    fast = FastPath(app, access)
    front: set[FrontProtocol] = set()
    listener = await asyncio.get_running_loop().create_server(
        lambda: FrontProtocol(server, fast, front, guard), sock=sock, backlog=BACKLOG
    )
    sweeper = Sweeper(guard)
    sweeper.start()
    return Running(runner, listener, front, fast, sweeper)


def _listen(config: Config) -> socket.socket:
    host, port = config.host_port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)
    sock.set_inheritable(True)
    return sock


def _supervise(config: Config, count: int, bootstrap: Bootstrap) -> int:
    async def start_up() -> None:
        storage = open_storage(config.storage, zstd_level=config.zstd_level)
        try:
            await bootstrap(config, storage)
        finally:
            await storage.close()

    sock = _listen(config)
    asyncio.run(start_up())
    directory = Path(tempfile.mkdtemp(prefix="larder-workers-"))
    shared.prepare(directory, count)
    stopping: list[int] = []

    def stop(signum: int, frame: object) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    procs: dict[int, tuple[subprocess.Popen[bytes], float]] = {}
    status = 0
    try:
        for index in range(count):
            worker = shared.Worker(index, count, directory)
            procs[index] = (_spawn(config, worker, sock), time.monotonic())
        log.info("serving with %d worker processes", count)
        while not stopping:
            time.sleep(0.2)
            for index, (proc, started) in list(procs.items()):
                code = proc.poll()
                if code is None:
                    continue
                _forget(directory, proc.pid)
                if code == 0 or time.monotonic() - started < MIN_UPTIME:
                    log.error("worker %d exited with status %d: stopping", index, code)
                    status = 0 if code == 0 else 1
                    stopping.append(0)
                    break
                log.warning("worker %d exited with status %d: restarting it", index, code)
                worker = shared.Worker(index, count, directory)
                procs[index] = (_spawn(config, worker, sock), time.monotonic())
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc, _ in procs.values():
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)
    return status


def _spawn(config: Config, worker: shared.Worker, sock: socket.socket) -> subprocess.Popen[bytes]:
    spec = {
        "config": asdict(config),
        "index": worker.index,
        "count": worker.count,
        "directory": str(worker.directory),
        "fd": sock.fileno(),
        "parent": os.getpid(),
    }
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(worker.metrics_dir)}
    argv = [sys.executable, "-m", "larder.service.server", json.dumps(spec)]
    return subprocess.Popen(argv, env=env, pass_fds=(sock.fileno(),))


def _forget(directory: Path, pid: int) -> None:
    """A worker is gone: drop its live gauges (its counters stay in the sums)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(directory / "metrics"))  # type: ignore[no-untyped-call]


def _worker_main(spec_text: str) -> int:
    spec = json.loads(spec_text)
    config = Config(**spec["config"])
    logging.basicConfig(level=config.log_level.upper(), format=LOG_FORMAT)
    raise_open_file_limit(config.max_connections)
    worker = shared.Worker(spec["index"], spec["count"], Path(spec["directory"]))
    sock = socket.socket(fileno=spec["fd"])
    storage = open_storage(config.storage, zstd_level=config.zstd_level)
    app = build_app(config, storage, worker=worker)
    parent = spec["parent"]

    async def watch_parent(app: web.Application) -> AsyncIterator[None]:
        async def check() -> None:
            while os.getppid() == parent:
                await asyncio.sleep(PARENT_CHECK)
            log.warning("worker %d: the supervisor is gone, stopping", worker.index)
            os.kill(os.getpid(), signal.SIGTERM)

        task = asyncio.create_task(check())
        yield
        task.cancel()

    app.cleanup_ctx.append(watch_parent)
    _run(config, app, sock)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1]))
