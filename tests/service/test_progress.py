"""Whether a client is taking what is written to it: steady slow readers are waited for, those
taking nothing for ``idle`` seconds are not."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from larder.service.front.limits import ConnectionGuard, Sweeper
from larder.service.progress import unsent, while_taking


class Draining:
    """A transport whose client takes ``rate`` bytes a second of ``held``."""

    def __init__(self, held: int, rate: float) -> None:
        self.held, self.rate = held, rate
        self._start = asyncio.get_running_loop().time()

    def get_write_buffer_size(self) -> int:
        taken = int((asyncio.get_running_loop().time() - self._start) * self.rate)
        return max(self.held - taken, 0)

    def get_extra_info(self, name: str) -> Any:
        return None


async def test_a_write_waits_for_a_client_taking_little_but_not_for_one_taking_nothing() -> None:
    loop = asyncio.get_running_loop()
    slow = Draining(10_000_000, 10_000)  # 10 KB/s of 10 MB: the buffer stays full for long
    waited = loop.create_future()
    loop.call_later(0.5, waited.set_result, "written")
    assert await while_taking(waited, slow, 0.1) == "written"  # five windows, each with some

    stuck = Draining(10_000_000, 0)
    never = loop.create_future()
    with pytest.raises(TimeoutError):
        await while_taking(never, stuck, 0.1)
    assert never.cancelled()


async def test_what_the_write_itself_queues_is_not_taken_for_the_clients_slowness() -> None:
    """A decoded ``.nar`` goes out in 256 KiB pieces: measured before the piece was queued, a
    client taking less than a piece per window looked as if it took nothing."""
    loop = asyncio.get_running_loop()
    slow = Draining(0, 100_000)  # 100 KB/s, under a piece per 0.1 s window
    written = loop.create_future()

    async def write_a_piece() -> str:
        slow.held += 256 * 1024
        return await written

    loop.call_later(0.5, written.set_result, "written")
    assert await while_taking(write_a_piece(), slow, 0.1) == "written"


async def test_unsent_counts_the_sockets_send_queue() -> None:
    """The kernel's queue holds most of what a client has not taken: the write buffer alone
    said nothing was waiting while megabytes were."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(server.getsockname())
    accepted, _ = server.accept()
    _, writer = await asyncio.open_connection(sock=accepted)
    writer.write(b"x" * 200_000)
    await asyncio.sleep(0.1)
    queued = unsent(writer.transport)
    assert queued > writer.transport.get_write_buffer_size()
    assert queued >= 100_000
    client.recv(65536)
    await asyncio.sleep(0.1)
    assert unsent(writer.transport) < queued
    writer.transport.abort()
    for sock in (client, server):
        sock.close()


class Stalled:
    """A connection whose write buffer filled at 1.0 (monotonic) and whose client took some of
    it ``taking`` times since."""

    head_since = 0.0
    idle_since = 0.0
    transport = None

    def __init__(self, taking: int) -> None:
        self.stalled_since = 1.0
        self.taking = taking
        self.expired = False

    def took_some(self) -> bool:
        self.taking -= 1
        return self.taking >= 0

    def expire(self) -> None:
        self.expired = True

    def close(self) -> None:
        raise AssertionError("not idle")

    def head_timed_out(self) -> None:
        raise AssertionError("no head is incomplete")


def test_the_sweep_drops_a_stalled_connection_only_once_its_client_took_nothing() -> None:
    guard = ConnectionGuard(0, 0, send_timeout=5.0)
    slow, stuck = Stalled(taking=1), Stalled(taking=0)
    guard.watched.update((slow, stuck))
    Sweeper(guard).sweep()
    assert stuck.expired and not slow.expired
    assert slow.stalled_since > 1.0  # its time starts again
    slow.stalled_since = 1.0
    Sweeper(guard).sweep()
    assert slow.expired
