"""Running ``larder serve``: one process, or a parent and ``workers`` worker processes.

With ``workers = 1`` (the default) the process that was started serves. With more, it becomes
a parent that serves nothing: it binds the listening socket, runs the start-up work once
(creating cache ``main``, adopting signing keys; with the storage unreachable, again in the
background until it answers, while the server serves and ``/readyz`` says 503), lays out a
shared directory (:mod:`larder.service.workers`) and runs the same ``larder serve`` command that
many times, each with the same flags, environment and config file plus its seat (index,
shared directory, inherited socket: :func:`~larder.service.config.worker_seat`). Then it sleeps
until a signal:

* a worker exited (SIGCHLD): it is started again, at once if it had run :data:`MIN_UPTIME`
  seconds, else after a back-off doubling from :data:`BACKOFF` seconds; after
  :data:`MAX_QUICK_EXITS` quick exits in a row the parent gives up and stops the server;
* a worker's heartbeat is older than ``worker_timeout`` (its event loop is blocked; checked
  every :func:`check_interval`): it is killed (SIGKILL) and so replaced;
* SIGTERM, SIGINT or SIGHUP: every worker gets SIGTERM, finishes what it is answering (within
  :data:`SHUTDOWN_TIMEOUT`) and exits; one still there after :data:`STOP_TIMEOUT` is killed.

A worker whose parent is gone stops by itself.

Each process runs its event loop on uvloop unless ``event_loop = "asyncio"``, writes its access log
through :class:`~larder.service.observability.access_log.LineSink`, and starts every connection with
:class:`~larder.service.front.connection.FrontProtocol`, which answers public narinfo GETs itself
and hands everything else to the aiohttp application.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from larder.errors import StorageError, StorageUnavailable
from larder.service import workers as shared
from larder.service.app import build_app
from larder.service.config import Config, ConfigError, WorkerSeat, format_listen, worker_seat
from larder.service.draining import HeldSockets, unsent
from larder.service.front.connection import FrontProtocol
from larder.service.front.limits import (
    KEEPALIVE_TIMEOUT,
    ConnectionGuard,
    GuardedAppRunner,
    Sweeper,
    raise_open_file_limit,
)
from larder.service.front.short_path import AccessLog, FastPath
from larder.service.observability import unreadable
from larder.service.observability.access_log import JsonAccessLogger, LineSink, TextAccessLogger
from larder.service.observability.recording import count_unreadable
from larder.service.routes.bodies import stop_reading
from larder.storage.base import Storage
from larder.storage.factory import open_storage

log = logging.getLogger("larder")

Bootstrap = Callable[[Config, Storage], Awaitable[None]]

#: Seconds before the next start-up attempt while the storage cannot be reached: the first
#: wait, doubled after each failure up to the second.
BOOTSTRAP_RETRY = (1.0, 30.0)


async def bootstrap_until_done(config: Config, storage: Storage, bootstrap: Bootstrap) -> None:
    """Run the start-up work again until the storage answers (one log line per attempt). Any
    storage error counts as not answering yet: an endpoint coming up may first answer that
    its bucket does not exist."""
    delay, cap = BOOTSTRAP_RETRY
    while True:
        await asyncio.sleep(delay)
        try:
            await bootstrap(config, storage)
        except StorageError as exc:
            delay = min(delay * 2, cap)
            log.warning("storage still unreachable (%s); next attempt in %.0f s", exc, delay)
            continue
        log.warning("storage reachable again: start-up work done")
        return


async def bootstrap_or_defer(config: Config, storage: Storage, bootstrap: Bootstrap) -> bool:
    """Run the start-up work; False, after one log line, when the storage cannot be reached
    (the server starts anyway: ``/readyz`` answers 503 until the storage is back, so an
    orchestrator routes nothing to it, and the caller retries with
    :func:`bootstrap_until_done`). Every other start-up error stops the server."""
    try:
        await bootstrap(config, storage)
    except StorageUnavailable as exc:
        log.warning(
            "storage unreachable at start-up (%s): serving, /readyz answers 503 until it is back",
            exc,
        )
        return False
    return True


#: A worker that exits sooner after its start is restarted only after a back-off.
MIN_UPTIME = 5.0
#: The first back-off in seconds; it doubles with each quick exit in a row, up to BACKOFF_MAX.
BACKOFF = 0.5
BACKOFF_MAX = 30.0
#: Signals that stop the server gracefully: SIGHUP too (a closed terminal, or an operator's
#: habit of "reload"): larder reads its settings only at start-up, so a restart is what
#: applies them, and dying on the spot would lose the recorded uses.
STOPPING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: Quick exits in a row of one worker after which the parent stops the server.
MAX_QUICK_EXITS = 5
#: Seconds a worker has, after its start, to beat its first heartbeat (at least worker_timeout).
START_TIMEOUT = 60.0
#: Seconds a stopping process waits for requests in progress before closing their connections.
SHUTDOWN_TIMEOUT = 25.0
#: Seconds the parent gives its workers to stop before it kills them.
STOP_TIMEOUT = 30.0
BACKLOG = 1024
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


#: Where the cgroup v2 hierarchy is mounted (in a container: its own cgroup).
CGROUP_ROOT = Path("/sys/fs/cgroup")


def worker_count(config: Config, cpu_max: Path | None = None) -> int:
    """``workers``, with 0 meaning one per CPU this process may use: the CPUs it may run on,
    fewer under a cgroup v2 CPU quota (a container's CPU limit), read from ``cpu_max``
    (default: this process's cgroup's ``cpu.max``)."""
    if config.workers:
        return config.workers
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = cpus or 1
    quota = cpu_quota(cpu_max if cpu_max is not None else _own_cpu_max())
    return max(1, min(cpus, quota)) if quota is not None else cpus


def _own_cpu_max() -> Path:
    """``cpu.max`` of this process's cgroup (v2: the ``0::`` line of ``/proc/self/cgroup``)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    own = next((line[3:] for line in lines if line.startswith("0::")), "/")
    return CGROUP_ROOT / own.lstrip("/") / "cpu.max"


def cpu_quota(cpu_max: Path) -> int | None:
    """CPUs a cgroup v2 ``cpu.max`` file (``"200000 100000"``: quota and period in µs) allows,
    rounded up; ``None`` without a file or a quota (``"max 100000"``)."""
    try:
        quota, _, period = cpu_max.read_text().strip().partition(" ")
        if quota == "max" or int(quota) <= 0:
            return None
        return max(1, math.ceil(int(quota) / int(period or "100000")))
    except (OSError, ValueError, ZeroDivisionError):
        return None


def new_event_loop(config: Config) -> asyncio.AbstractEventLoop:
    if config.event_loop == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def serve(config: Config, bootstrap: Bootstrap, command: Sequence[str]) -> int:
    """Serve until SIGTERM, SIGINT or SIGHUP; the exit status.

    ``command`` is the ``larder serve`` command line that was run (the parent of a
    multi-process server runs it again for each worker).
    """
    seat = worker_seat()
    if seat is not None:
        return _serve_worker(config, seat)
    count = worker_count(config)
    if count == 1:
        raise_open_file_limit(config.max_connections)
        sock = _listen(config)
        config = _bound(config, sock)
        storage = open_storage(
            config.storage, zstd_level=config.zstd_level, timeout=config.storage_timeout
        )
        app = build_app(config, storage)

        async def deferred(app: web.Application) -> AsyncIterator[None]:
            retry = None
            if not await bootstrap_or_defer(config, storage, bootstrap):
                retry = asyncio.create_task(bootstrap_until_done(config, storage, bootstrap))
            yield
            if retry is not None:
                retry.cancel()

        # First: a fatal start-up error then stops the server before any background task runs.
        app.cleanup_ctx.insert(0, deferred)
        _run(config, app, sock)
        return 0
    return _supervise(config, count, bootstrap, command)


def _run(config: Config, app: web.Application, sock: socket.socket) -> None:
    """Serve ``app`` on ``sock`` until SIGTERM, SIGINT or SIGHUP, then shut down gracefully."""
    sink = LineSink(sys.stderr, prefixed=config.access_log != "json")  # json: JSON lines
    loop = new_event_loop(config)
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(_serve_app(config, app, sock, sink))
    finally:
        sink.flush()
        _cancel_left_over(loop)
        loop.run_until_complete(loop.shutdown_asyncgens())
        asyncio.set_event_loop(None)
        loop.close()


def _cancel_left_over(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel the tasks still pending once serving stopped, and let them end, as
    ``asyncio.run`` does: aiohttp leaves the handler of a connection the client closed to read
    a body that never comes for up to 10 s (a refused ``Expect: 100-continue`` upload), and a
    loop closed under it logs "Task was destroyed but it is pending!" as an error."""
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))


async def _serve_app(
    config: Config, app: web.Application, sock: socket.socket, sink: LineSink
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in STOPPING:
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
        """Accept no more; let the answers in progress end (the short path's and the
        application's alike, within :data:`SHUTDOWN_TIMEOUT`), then, within the same time,
        until what they wrote has left (:mod:`~larder.service.draining`)."""
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT
        self.listener.close()
        self.sweeper.stop()
        # Held: connections with an answer in progress, or whose answers have not all left
        # (closed with requests unread, they would be reset); an idle one closes (FIN) at once.
        front = list(self.front)
        sending = {c.transport for c in front if c.transport is not None and unsent(c.transport)}
        busy = [connection for connection in front if not connection.stop()]
        handlers = list(getattr(self.runner.server, "connections", ()))
        held = HeldSockets()
        held.hold(sending | {connection.transport for connection in busy})
        held.hold(h.transport for h in handlers if getattr(h, "_request_in_progress", True))
        stop_reading(self.runner.app)
        # aiohttp waits shutdown_timeout for a handler, then as long again for it to end once
        # cancelled (a write to a client that reads nothing ends neither): at the deadline the
        # connections still open are cut, so the application's cleanup runs on time.
        cut = asyncio.ensure_future(_cut_at(deadline, handlers))
        try:
            await asyncio.gather(self.runner.cleanup(), _answered(busy, self.front, deadline))
        finally:
            cut.cancel()
        self.fast.flush()
        await held.drained(deadline)


async def _cut_at(deadline: float, handlers: list[Any]) -> None:
    """At ``deadline``, abort the transports of ``handlers`` (aiohttp's) still open."""
    await asyncio.sleep(max(0.0, deadline - time.monotonic()))
    for handler in handlers:
        transport = handler.transport
        if transport is not None and not transport.is_closing():
            transport.abort()


async def _answered(busy: list[FrontProtocol], still: set[FrontProtocol], deadline: float) -> None:
    """Wait until none of ``busy`` is ``still`` open (each closes once answered); close those
    left at ``deadline``."""
    while busy and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        busy = [connection for connection in busy if connection in still]
    for connection in busy:
        connection.close()


async def start(
    config: Config, app: web.Application, sock: socket.socket, sink: LineSink
) -> Running:
    """Start ``app`` (its start-up hooks run now) on the listening ``sock``."""
    unreadable.install(functools.partial(count_unreadable, app))
    logger = JsonAccessLogger if config.access_log == "json" else TextAccessLogger
    guard = ConnectionGuard(config.header_timeout, config.max_connections, config.body_idle_timeout)
    runner = GuardedAppRunner(
        app,
        guard,
        access_log_class=logger.writing_to(sink, config.trusted_proxy_networks),
        keepalive_timeout=KEEPALIVE_TIMEOUT,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
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
    try:
        sock.bind((host, port))
    except OSError as exc:  # taken, not this machine's address, a name that does not resolve
        sock.close()
        reason = exc.strerror or str(exc)
        raise ConfigError(f"cannot listen on {config.listen}: {reason}") from None
    sock.listen(BACKLOG)
    sock.set_inheritable(True)
    return sock


def _bound(config: Config, sock: socket.socket) -> Config:
    """``config`` with the port ``sock`` got when ``listen`` asked for port 0 (any free one)."""
    host, port = config.host_port
    if port != 0:
        return config
    return dataclasses.replace(config, listen=format_listen(host, sock.getsockname()[1]))


def check_interval(worker_timeout: float) -> float:
    """Seconds between the parent's looks at the heartbeats."""
    return max(worker_timeout / 4, 0.25)


@dataclass
class _Seat:
    """One worker slot of the parent: the process in it and its recent history."""

    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    quick_exits: int = 0
    #: When to start it (monotonic seconds); None while it runs or after giving up.
    restart_at: float | None = 0.0


class _Parent:
    """The parent of a multi-process server (see the module docstring)."""

    def __init__(
        self, config: Config, count: int, command: Sequence[str], sock: socket.socket
    ) -> None:
        self.command = list(command)
        self.sock = sock
        self.timeout = config.worker_timeout
        self.directory, self._lock = shared.make_directory()
        shared.prepare(self.directory, count)
        self.heartbeats = shared.Heartbeats(self.directory)
        self.seats = [_Seat(index) for index in range(count)]
        self.status = 0

    def run(self) -> int:
        """Start the workers, keep them running until a stop signal, stop them; exit status."""
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_read, False)
        os.set_blocking(wake_write, False)
        previous = signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
        # Each of these signals writes its number to the wake-up fd the parent sleeps on.
        handlers = {signum: signal.signal(signum, _note) for signum in _WAKING}
        try:
            log.info("serving with %d worker processes", len(self.seats))
            stopping = False
            next_check = time.monotonic() + check_interval(self.timeout)
            while not stopping:
                now = time.monotonic()
                self._start_due(now)
                if self.status:
                    break
                due = [next_check] + [
                    seat.restart_at for seat in self.seats if seat.restart_at is not None
                ]
                signums = _wait(wake_read, max(min(due) - time.monotonic(), 0.0))
                stopping = bool(signums & set(STOPPING))
                if stopping:
                    log.info("stopping %d worker processes", len(self.seats))
                    break
                self._reap()
                if time.monotonic() >= next_check:
                    self._kill_hung()
                    next_check = time.monotonic() + check_interval(self.timeout)
            self._stop_all(wake_read)
        finally:
            signal.set_wakeup_fd(previous)
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            os.close(wake_read)
            os.close(wake_write)
            shutil.rmtree(self.directory, ignore_errors=True)
            os.close(self._lock)
        return self.status

    def _start_due(self, now: float) -> None:
        for seat in self.seats:
            if seat.restart_at is not None and seat.restart_at <= now:
                self._start(seat)

    def _start(self, seat: _Seat) -> None:
        self.heartbeats.clear(seat.index)
        worker_env = WorkerSeat(
            seat.index, str(self.directory), self.sock.fileno(), os.getpid()
        ).environ()
        env = {
            **os.environ,
            **worker_env,
            "PROMETHEUS_MULTIPROC_DIR": str(self.directory / shared.METRICS),
        }
        try:
            seat.proc = subprocess.Popen(self.command, env=env, pass_fds=(self.sock.fileno(),))
        except OSError as exc:
            log.error("cannot start worker %d: %s: stopping", seat.index, exc)
            self.status = 1
            return
        seat.started = time.monotonic()
        seat.restart_at = None

    def _reap(self) -> None:
        """Note every worker that exited and plan its restart (or give up)."""
        for seat in self.seats:
            if seat.proc is None or seat.proc.poll() is None:
                continue
            code, pid = seat.proc.returncode, seat.proc.pid
            seat.proc = None
            _forget(self.directory, pid)
            uptime = time.monotonic() - seat.started
            if uptime >= MIN_UPTIME:
                seat.quick_exits = 0
                delay = 0.0
            else:
                seat.quick_exits += 1
                if seat.quick_exits >= MAX_QUICK_EXITS:
                    log.error(
                        "worker %d exited with status %d %d times in a row within %.0f s of "
                        "its start: giving up, stopping the server",
                        seat.index,
                        code,
                        seat.quick_exits,
                        MIN_UPTIME,
                    )
                    self.status = 1
                    continue
                delay = min(BACKOFF * 2 ** (seat.quick_exits - 1), BACKOFF_MAX)
            log.warning(
                "worker %d (pid %d) exited with status %d after %.1f s: restarting it in %.1f s",
                seat.index,
                pid,
                code,
                uptime,
                delay,
            )
            seat.restart_at = time.monotonic() + delay

    def _kill_hung(self) -> None:
        """Kill every worker whose heartbeat is too old (its exit then restarts it)."""
        for seat in self.seats:
            if seat.proc is None or seat.proc.returncode is not None:
                continue
            age = self.heartbeats.age(seat.index)
            if age is None:
                limit = max(START_TIMEOUT, self.timeout)
                age = time.monotonic() - seat.started
            else:
                limit = self.timeout
            if age > limit:
                log.error(
                    "worker %d (pid %d) sent no heartbeat for %.1f s: killing it",
                    seat.index,
                    seat.proc.pid,
                    age,
                )
                seat.proc.kill()

    def _stop_all(self, wake_read: int) -> None:
        """SIGTERM every worker; wait for them (SIGKILL after :data:`STOP_TIMEOUT`)."""
        live = [seat.proc for seat in self.seats if seat.proc is not None]
        for proc in live:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        while any(proc.poll() is None for proc in live):
            left = deadline - time.monotonic()
            if left <= 0:
                for proc in live:
                    if proc.poll() is None:
                        log.error("worker pid %d did not stop in time: killing it", proc.pid)
                        proc.kill()
                        proc.wait()
                break
            _wait(wake_read, left)
        for proc in live:
            _forget(self.directory, proc.pid)


_WAKING = (signal.SIGCHLD, *STOPPING)


def _note(signum: int, frame: object) -> None:
    """A Python-level handler, so that the signal reaches the wake-up fd."""


def _wait(wake_read: int, timeout: float) -> set[int]:
    """Sleep until a signal arrives or ``timeout`` seconds pass; the signals that arrived."""
    ready, _, _ = select.select([wake_read], [], [], timeout)
    signums: set[int] = set()
    if ready:
        try:
            while chunk := os.read(wake_read, 64):
                signums.update(chunk)
        except BlockingIOError:
            pass
    return signums


def _supervise(config: Config, count: int, bootstrap: Bootstrap, command: Sequence[str]) -> int:
    async def start_up(retrying: bool) -> bool:
        storage = open_storage(
            config.storage, zstd_level=config.zstd_level, timeout=config.storage_timeout
        )
        try:
            if retrying:
                await bootstrap_until_done(config, storage, bootstrap)
                return True
            return await bootstrap_or_defer(config, storage, bootstrap)
        finally:
            await storage.close()

    sock = _listen(config)
    config = _bound(config, sock)
    try:
        if not asyncio.run(start_up(retrying=False)):
            # The workers serve meanwhile; the parent's own loop waits for signals.
            threading.Thread(
                target=asyncio.run, args=(start_up(retrying=True),), daemon=True
            ).start()
        return _Parent(config, count, command, sock).run()
    finally:
        sock.close()


def _forget(directory: Path, pid: int) -> None:
    """A worker is gone: drop its live gauges (its counters stay in the sums)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(directory / shared.METRICS))  # type: ignore[no-untyped-call]


def _serve_worker(config: Config, seat: WorkerSeat) -> int:
    """Serve as worker ``seat.index`` of a multi-process server, on the inherited socket."""
    raise_open_file_limit(config.max_connections)
    worker = shared.Worker(seat.index, Path(seat.directory))
    heartbeats = shared.Heartbeats(worker.directory)
    sock = socket.socket(fileno=seat.listen_fd)
    storage = open_storage(
        config.storage, zstd_level=config.zstd_level, timeout=config.storage_timeout
    )
    app = build_app(config, storage, worker=worker)
    parent = seat.parent or os.getppid()
    if os.getppid() != parent:  # the parent died while this worker started
        log.warning("worker %d: the parent process is gone, not starting", seat.index)
        return 1
    interval = shared.heartbeat_interval(config.worker_timeout)

    async def heartbeat(app: web.Application) -> AsyncIterator[None]:
        async def beat() -> None:
            while os.getppid() == parent:
                heartbeats.beat(worker.index)
                await asyncio.sleep(interval)
            log.warning("worker %d: the parent process is gone, stopping", worker.index)
            os.kill(os.getpid(), signal.SIGTERM)

        task = asyncio.create_task(beat())
        yield
        task.cancel()

    app.cleanup_ctx.append(heartbeat)
    _run(config, app, sock)
    return 0
