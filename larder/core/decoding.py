"""A process's budget of memory for the decoders of uploads.

Each upload in a compression holds a decoder whose memory its own stream chooses: a zstd frame
may ask for a 128 MiB window, an xz stream for a 128 MiB dictionary. Without a bound, a few
hundred slow uploads of a few hundred KiB would take all the memory of a server. So an upload
reserves what its decoder needs, as soon as the stream's header says it and before the decoder
is made (:class:`~larder.protocol.compression.Decompressor` pauses until it is allowed that
much), from one :class:`DecoderBudget` per process. A reservation that does not fit waits up to
the budget's ``wait`` seconds for others to end, then is :class:`~larder.errors.Busy`
(503, asked again shortly); one larger than the whole budget is
:class:`~larder.errors.TooLarge`. The reservation of an upload grows to the largest need of its
streams and is released when the upload ends, however it ends.

Waiting happens on the event loop: no worker thread is held by an upload that waits.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Protocol

from larder.errors import Busy, TooLarge


class Pausing(Protocol):
    """A decoding step that pauses for memory (a Decompressor, an ingest)."""

    @property
    def wants(self) -> int: ...

    def resume(self, allowance: int) -> None: ...


class DecoderBudget:
    """``total`` bytes of decoder memory shared by the uploads of one process."""

    def __init__(
        self,
        total: int,
        wait: float = 5.0,
        observe: Callable[[int], None] | None = None,
        waited: Callable[[], None] | None = None,
    ) -> None:
        if total <= 0:
            raise ValueError("the decoder memory budget must be positive")
        self.total = total
        self.wait = wait
        #: Told the bytes reserved after each change; told of each upload that had to wait.
        self._observe = observe
        self._waited = waited
        #: Bytes reserved right now.
        self.reserved = 0
        #: Uploads holding a reservation right now.
        self.holders = 0
        self._waiters: list[asyncio.Future[None]] = []

    @asynccontextmanager
    async def reservation(self) -> AsyncIterator[Reservation]:
        """A reservation of nothing yet, released whatever happens in the block."""
        held = Reservation(self)
        try:
            yield held
        finally:
            held.release()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _take(self, extra: int, need: int) -> None:
        if need > self.total:
            raise TooLarge(
                f"decoding this upload needs {need} bytes of memory, more than the "
                f"{self.total} this server gives all uploads' decoders together"
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait
        if self.reserved + extra > self.total and self._waited is not None:
            self._waited()
        while self.reserved + extra > self.total:
            left = deadline - loop.time()
            if left <= 0:
                raise Busy(
                    f"decoding this upload needs {need} bytes of memory and the uploads under "
                    f"way hold {self.reserved} of the {self.total} allowed; send it again shortly"
                )
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, left)
            except TimeoutError:
                pass
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self.reserved += extra
        self._changed()

    def _changed(self) -> None:
        if self._observe is not None:
            self._observe(self.reserved)


class Reservation:
    """What one upload holds of a :class:`DecoderBudget`."""

    def __init__(self, budget: DecoderBudget) -> None:
        self._budget = budget
        self.held = 0
        self._released = False

    async def grow(self, need: int) -> None:
        """Hold at least ``need`` bytes (waiting, then :class:`Busy`; see the module)."""
        if self._released:
            raise RuntimeError("the reservation was released")
        extra = need - self.held
        if extra <= 0:
            return
        await self._budget._take(extra, need)
        if not self.held:
            self._budget.holders += 1
        self.held = need

    def release(self) -> None:
        """Give back what is held (idempotent)."""
        if self._released:
            return
        self._released = True
        budget = self._budget
        if self.held:
            budget.reserved -= self.held
            budget.holders -= 1
            self.held = 0
            budget._changed()
            budget._wake()


def first_allowance(reservation: Reservation | None) -> int | None:
    """What a decoder may hold before it asks for memory: what ``reservation`` holds (nothing
    yet), or ``None`` (unaccounted) without one."""
    return None if reservation is None else reservation.held


async def settle(
    step: Pausing, reservation: Reservation, run: Callable[..., Awaitable[None]]
) -> None:
    """While ``step`` waits for memory: reserve it, then resume ``step`` with ``run`` (which
    runs a blocking call on a worker thread)."""
    while step.wants:
        await reservation.grow(step.wants)
        await run(step.resume, reservation.held)
