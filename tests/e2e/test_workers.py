"""`larder serve --workers 2`: both workers accept on one port, `/metrics` sums both, a narinfo
uploaded through one is served by the other at once; the parent replaces a worker that dies or
hangs, gives up on one that keeps dying at start, and stops them all (gracefully) on SIGTERM.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from larder.protocol import nix32
from larder.protocol.nar import write_nar
from larder.service.config import WORKER_DIR_ENV, WORKER_INDEX_ENV, WorkerSeat
from larder.service.server import BACKOFF, MAX_QUICK_EXITS
from larder.service.workers import Heartbeats, prepare
from tests.e2e.harness import LARDER, Larder, larder_server
from tests.wait import wait_until

WORKERS = 2


OPENED: list[Connection] = []


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Larder]:
    with larder_server(
        str(tmp_path / "data"),
        tmp_path,
        {"LARDER_WORKER_TIMEOUT": "2"},
        ["--workers", str(WORKERS)],
    ) as s:
        try:
            yield s
        finally:
            while OPENED:
                OPENED.pop().conn.close()


def workers_of(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in text.split()]


def has_beaten(worker: int) -> bool:
    """Whether worker process ``worker`` has started serving (its first heartbeat is in)."""
    raw = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
    env = dict(item.decode().split("=", 1) for item in raw if b"=" in item)
    seat = int(env[WORKER_INDEX_ENV])
    return Heartbeats(Path(env[WORKER_DIR_ENV])).age(seat) is not None


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def server_side_inode(server_port: int, client_port: int) -> str | None:
    """The inode of the accepted socket that talks to ``client_port`` (from /proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        remote_port = int(fields[2].split(":")[1], 16)
        if local_port == server_port and remote_port == client_port:
            return fields[9]
    return None


class Connection:
    """One keep-alive connection and the worker that accepted it."""

    def __init__(self, server: Larder, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        OPENED.append(self)
        self.status, _ = self.request("GET", "/main/nix-cache-info")
        self.worker = 0
        inode = server_side_inode(port, self.conn.sock.getsockname()[1])
        for pid in workers_of(server.pid):
            if inode is not None and inode in socket_inodes(pid):
                self.worker = pid

    def request(
        self, method: str, path: str, body: bytes | None = None, token: str = ""
    ) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.conn.request(method, path, body=body, headers=headers)
        response = self.conn.getresponse()
        return response.status, response.read()


def one_per_worker(server: Larder) -> tuple[list[Connection], dict[int, Connection]]:
    """Open connections until every worker has accepted one; all of them, and one per worker."""
    port = int(server.url.rsplit(":", 1)[1])
    opened: list[Connection] = []
    by_worker: dict[int, Connection] = {}
    while len(by_worker) < WORKERS and len(opened) < 200:
        conn = Connection(server, port)
        assert conn.status == 200 and conn.worker, "an unknown process accepted the connection"
        opened.append(conn)
        by_worker.setdefault(conn.worker, conn)
    assert len(by_worker) == WORKERS, f"{len(opened)} connections all went to one worker"
    return opened, by_worker


def scrape(conn: Connection) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = conn.request("GET", "/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


NIX_2XX = (
    "larder_http_requests_total",
    (("cache", "main"), ("protocol", "nix"), ("status_class", "2xx")),
)


def test_every_worker_serves_and_metrics_are_summed_across_workers(server: Larder) -> None:
    assert len(workers_of(server.pid)) == WORKERS
    log = server.log()  # the start-up work ran once, in the parent
    assert log.count("created cache 'main'") == 1 and log.count("larder serving on") == 1
    opened, by_worker = one_per_worker(server)
    for conn in by_worker.values():
        assert conn.request("GET", "/main/nix-cache-info")[0] == 200
    sent = len(opened) + len(by_worker)
    for conn in by_worker.values():  # whichever worker renders them, the figures are the sums
        samples = scrape(conn)
        assert samples[NIX_2XX] == sent
        assert samples[("larder_http_requests_in_flight", ())] == 1  # this scrape, live workers
    stats = by_worker[next(iter(by_worker))].request("GET", "/api/v1/caches/main/stats")
    assert b"worker process" in stats[1]


def test_a_narinfo_stored_through_one_worker_is_served_by_the_other(server: Larder) -> None:
    _, by_worker = one_per_worker(server)
    first, second = by_worker.values()
    token = server.token()
    nar = write_nar({"type": "regular", "contents": b"fresh"})
    digest = nix32.encode(hashlib.sha256(nar).digest())
    store_hash = nix32.encode(hashlib.sha256(b"workers").digest()[:20])
    narinfo = (
        f"StorePath: /nix/store/{store_hash}-rust_w-1.0.0\nURL: nar/{digest}.nar\n"
        f"Compression: none\nNarHash: sha256:{digest}\nNarSize: {len(nar)}\nReferences: \n"
    ).encode()
    for conn in (first, second):  # both remember the miss
        assert conn.request("GET", f"/main/{store_hash}.narinfo")[0] == 404
    assert first.request("PUT", f"/main/nar/{digest}.nar", nar, token)[0] == 200
    assert first.request("PUT", f"/main/{store_hash}.narinfo", narinfo, token)[0] == 200
    status, body = second.request("GET", f"/main/{store_hash}.narinfo")
    assert status == 200, body
    assert f"NarHash: sha256:{digest}".encode() in body
    for _ in range(3):  # remembered, and answered from what is remembered
        assert second.request("GET", f"/main/{store_hash}.narinfo") == (200, body)
    # Stored again with one more signature (`nix store sign`): the other worker serves it at once.
    sig = "other-1:" + base64.b64encode(bytes(64)).decode()
    assert first.request("PUT", f"/main/{store_hash}.narinfo", narinfo + f"Sig: {sig}\n".encode(),
                         token)[0] == 200  # fmt: skip
    status, body = second.request("GET", f"/main/{store_hash}.narinfo")
    assert status == 200 and f"Sig: {sig}".encode() in body, body


def wait_for_workers(server: Larder, gone: int, timeout: float = 20) -> list[int]:
    """The workers, once there are WORKERS of them again and ``gone`` is not one of them."""
    deadline = time.monotonic() + timeout
    while True:
        now = workers_of(server.pid)
        if len(now) == WORKERS and gone not in now:
            return now
        assert time.monotonic() < deadline, f"no replacement for {gone}: {now}"
        time.sleep(0.1)


def answers(server: Larder) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    for _ in range(10):  # whichever worker accepts, it answers
        assert Connection(server, port).status == 200


def state_of(pid: int) -> str:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(line for line in status.splitlines() if line.startswith("State:"))


def test_one_worker_is_one_process(tmp_path: Path) -> None:
    with larder_server(str(tmp_path / "data"), tmp_path, extra_args=["--workers", "1"]) as server:
        assert workers_of(server.pid) == []
        answers(server)


def test_a_worker_that_dies_is_replaced(server: Larder) -> None:
    before = workers_of(server.pid)
    os.kill(before[0], signal.SIGKILL)
    now = wait_for_workers(server, before[0])
    assert before[1] in now  # the other one kept running
    answers(server)
    assert f"pid {before[0]}) exited with status -9" in server.log()


def test_a_hung_worker_is_killed_and_replaced(server: Larder) -> None:
    before = workers_of(server.pid)
    # Both started serving: one stopped before its first heartbeat is given the start-up time.
    wait_until(lambda: all(has_beaten(worker) for worker in before), 30, what="first heartbeats")
    answers(server)
    os.kill(before[0], signal.SIGSTOP)  # its event loop stops: no more heartbeats
    try:
        now = wait_for_workers(server, before[0])
    finally:
        if before[0] in workers_of(server.pid):  # still the stopped worker (not a reused pid)
            os.kill(before[0], signal.SIGKILL)
    assert before[1] in now
    answers(server)
    assert f"worker 0 (pid {before[0]}) sent no heartbeat for" in server.log()


def test_sigterm_stops_every_worker_after_the_requests_in_progress(server: Larder) -> None:
    children = workers_of(server.pid)
    token = server.token()
    nar = write_nar({"type": "regular", "contents": os.urandom(16 << 20)})
    digest = nix32.encode(hashlib.sha256(nar).digest())
    port = int(server.url.rsplit(":", 1)[1])
    assert Connection(server, port).request("PUT", f"/main/nar/{digest}.nar", nar, token)[0] == 200
    with socket.create_connection(("127.0.0.1", port), timeout=10) as download:
        # A range is answered by the application, which streams the whole NAR: the client
        # reads slowly, so the response is still being sent when the server is told to stop.
        download.sendall(
            f"GET /main/nar/{digest}.nar.zst HTTP/1.1\r\nHost: x\r\n"
            "Range: bytes=0-\r\n\r\n".encode()
        )
        received = download.recv(65536)
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 206"), head
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        assert length > 1 << 20
        os.kill(server.pid, signal.SIGTERM)
        time.sleep(1.0)
        while len(body) < length and (chunk := download.recv(1 << 20)):
            body += chunk
    assert len(body) == length, "the response in progress was cut off"
    deadline = time.monotonic() + 15
    while any(Path(f"/proc/{pid}").exists() for pid in children) or "zombie" not in state_of(
        server.pid
    ):
        assert time.monotonic() < deadline, "processes outlived the SIGTERM"
        time.sleep(0.1)
    assert "stopping 2 worker processes" in server.log()


def test_a_worker_that_keeps_dying_at_start_is_given_up_on(tmp_path: Path) -> None:
    config = tmp_path / "larder.toml"
    config.write_text("workers = 2\n")
    with larder_server(
        str(tmp_path / "data"), tmp_path, extra_args=["--config", str(config)]
    ) as server:
        before = workers_of(server.pid)
        config.write_text('workers = "many"\n')  # a worker started now cannot read its config
        os.kill(before[0], signal.SIGKILL)
        deadline = time.monotonic() + 40
        while "zombie" not in state_of(server.pid):
            assert time.monotonic() < deadline, "the parent kept restarting a failing worker"
            time.sleep(0.2)
        log = server.log()
    assert f"restarting it in {BACKOFF:.1f} s" in log
    assert f"restarting it in {2 * BACKOFF:.1f} s" in log
    assert f"{MAX_QUICK_EXITS} times in a row" in log
    assert "giving up, stopping the server" in log
    assert not any(Path(f"/proc/{pid}").exists() for pid in before)


def test_a_worker_whose_parent_died_while_it_started_does_not_serve(tmp_path: Path) -> None:
    """A worker reading ``getppid()`` itself would read 1 once its parent was killed while it
    started, and serve on as an orphan holding the port; it is told its parent's pid."""
    shared = tmp_path / "shared"
    prepare(shared, 1)
    listener = socket.create_server(("127.0.0.1", 0))
    seat = WorkerSeat(0, str(shared), listener.fileno(), parent=1)  # not this worker's parent
    env = {**os.environ, **seat.environ(), "PROMETHEUS_MULTIPROC_DIR": str(shared / "metrics")}
    try:
        done = subprocess.run(
            [*LARDER, "serve", "--storage", str(tmp_path / "data")],
            env=env, cwd=tmp_path, pass_fds=(listener.fileno(),), capture_output=True,
            text=True, timeout=60,
        )  # fmt: skip
    finally:
        listener.close()
    assert done.returncode == 1, done.stderr
    assert "the parent process is gone, not starting" in done.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_stops_the_server_gracefully(tmp_path: Path, workers: int) -> None:
    """SIGHUP (a closed terminal) killed a single process on the spot, its recorded uses lost,
    and left a multi-process server's workers running on as orphans for a while."""
    with larder_server(
        str(tmp_path / "data"), tmp_path, extra_args=["--workers", str(workers)]
    ) as server:
        children = workers_of(server.pid) if workers > 1 else []
        os.kill(server.pid, signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "zombie" not in state_of(server.pid):
            assert time.monotonic() < deadline, "the server outlived SIGHUP"
            time.sleep(0.1)
        assert not any(Path(f"/proc/{pid}").exists() for pid in children)
        assert os.waitpid(server.pid, 0)[1] == 0  # a clean exit, not death by the signal


def test_a_download_still_queued_for_a_slow_client_at_exit_arrives_whole(tmp_path: Path) -> None:
    """The server finishes sending within its grace while a slow client still has the last bytes
    to read from the kernel's send queue: a process that exited then left the client a 200 some
    32 KiB short. The process stays until the queue is empty (or the grace ends)."""
    nar = write_nar({"type": "regular", "contents": os.urandom(8 << 20)})
    digest = nix32.encode(hashlib.sha256(nar).digest())
    with larder_server(str(tmp_path / "data"), tmp_path) as server:
        port = int(server.url.rsplit(":", 1)[1])
        put = Connection(server, port).request(
            "PUT", f"/main/nar/{digest}.nar", nar, server.token()
        )
        assert put[0] == 200
        with socket.create_connection(("127.0.0.1", port), timeout=30) as download:
            download.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
            download.sendall(f"GET /main/nar/{digest}.nar HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            received = b""
            stop_at = time.monotonic() + 1.0
            while chunk := download.recv(32 * 1024):
                received += chunk
                time.sleep(len(chunk) / 4e5)  # about 400 KB/s: some 20 s
                if stop_at and time.monotonic() > stop_at:
                    os.kill(server.pid, signal.SIGTERM)
                    stop_at = 0.0
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert len(body) == len(nar), f"{len(nar) - len(body)} bytes short"
