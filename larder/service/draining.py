"""The last bytes of answers a stopping server sent: kept going until the client has them.

Closing a socket whose send queue still holds data leaves it to the kernel as an orphan, which
gives up on a slow reader soon after the process is gone (``tcp_orphan_retries``): a download
finished by the server within its grace period reached the client a few dozen KiB short. A
stopping process therefore holds a duplicate of each connection's socket, lets the server close
its own, and closes each duplicate once the queue is empty (``TIOCOUTQ``: bytes not yet
acknowledged), or when the grace period ends.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import struct
import termios
import time
from collections.abc import Iterable
from typing import Any

#: Seconds between looks at the send queues.
POLL = 0.05
_OUTQ = getattr(termios, "TIOCOUTQ", None)


class HeldSockets:
    """Duplicates of connections' sockets, closed once their data left (:meth:`drained`)."""

    def __init__(self) -> None:
        self._fds: list[int] = []

    def hold(self, transports: Iterable[Any]) -> None:
        """Keep the socket of each of ``transports`` (asyncio transports; others are skipped)."""
        for transport in transports:
            sock = transport.get_extra_info("socket") if transport is not None else None
            if sock is None or _OUTQ is None:
                continue
            try:
                self._fds.append(os.dup(sock.fileno()))
            except (OSError, ValueError):
                continue  # closed meanwhile

    async def drained(self, deadline: float) -> None:
        """Close each held socket once nothing is queued on it, the rest at ``deadline``
        (``time.monotonic()``)."""
        try:
            while self._fds:
                kept = []
                for fd in self._fds:
                    if _queued(fd):
                        kept.append(fd)
                    else:
                        os.close(fd)
                self._fds = kept
                if not kept or time.monotonic() >= deadline:
                    break
                await asyncio.sleep(POLL)
        finally:
            for fd in self._fds:
                os.close(fd)
            self._fds = []


def _queued(fd: int) -> bool:
    try:
        queued: int = struct.unpack("i", fcntl.ioctl(fd, _OUTQ or 0, b"\0\0\0\0"))[0]
    except OSError:
        return False
    return queued > 0


def unsent(transport: Any) -> bool:
    """Whether bytes written to ``transport`` have not all left: in its buffer, or in the
    kernel's send queue (a client reading slowly behind pipelined requests)."""
    if transport.get_write_buffer_size():
        return True
    sock = transport.get_extra_info("socket")
    return sock is not None and _OUTQ is not None and _queued(sock.fileno())
