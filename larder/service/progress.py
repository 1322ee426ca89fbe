"""Whether a client is taking what the server writes to it.

A client that takes nothing for ``body_idle_timeout`` is dropped; one taking little is not. The
write buffer emptying cannot tell them apart: the kernel's send queue grows to megabytes on a
fast link, a socket is writable again only once a third of it has left, and a client reading
steadily at a few KiB/s leaves a transport paused for minutes. What tells them apart is the
count of bytes written and not yet taken (:func:`unsent`) going down.
"""

from __future__ import annotations

import asyncio
import fcntl
import struct
import termios
from collections.abc import Awaitable
from typing import TypeVar, cast

T = TypeVar("T")


def unsent(transport: asyncio.BaseTransport | None) -> int:
    """Bytes written to ``transport`` that its client has not taken yet: its write buffer and
    the socket's send queue (Linux's ``SIOCOUTQ``; the buffer alone where that cannot be read)."""
    if transport is None:
        return 0
    held = cast(asyncio.WriteTransport, transport).get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    queued = send_queue(sock.fileno()) if sock is not None else None
    return held + (queued or 0)


def send_queue(fd: int) -> int | None:
    """Bytes in socket ``fd``'s send queue its peer has not taken (``SIOCOUTQ``), or None."""
    try:
        queued = fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return None
    return int(struct.unpack("i", queued)[0])


async def while_taking(
    work: Awaitable[T], transport: asyncio.BaseTransport | None, idle: float
) -> T:
    """Await ``work`` (a write waiting for the client) for as long as the client takes some of
    what was written within every ``idle`` seconds; :class:`TimeoutError` (``work`` cancelled)
    once it takes nothing for that long."""
    task = asyncio.ensure_future(work)
    await asyncio.sleep(0)  # the write queues its bytes first: they are not taken yet either
    left = unsent(transport)
    try:
        while True:
            done, _ = await asyncio.wait((task,), timeout=idle)
            if done:
                return task.result()
            before, left = left, unsent(transport)
            if left >= before:
                raise TimeoutError(f"the client took nothing for {idle:g} s")
    finally:
        if not task.done():
            task.cancel()
