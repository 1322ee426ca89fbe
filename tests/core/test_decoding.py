"""The per-process budget of upload decoder memory: reserve, grow, release, wait, refuse."""

from __future__ import annotations

import asyncio

import pytest

from larder.core.decoding import DecoderBudget, settle
from larder.errors import Busy, TooLarge
from larder.protocol.compression import Compressor, Decompressor, zstd_frame_need

MiB = 1024 * 1024


async def test_reservations_grow_to_the_largest_need_and_are_released() -> None:
    budget = DecoderBudget(100 * MiB, wait=0.1)
    async with budget.reservation() as one:
        await one.grow(10 * MiB)
        await one.grow(4 * MiB)  # never shrinks
        assert (one.held, budget.reserved, budget.holders) == (10 * MiB, 10 * MiB, 1)
        await one.grow(30 * MiB)
        assert budget.reserved == 30 * MiB
        async with budget.reservation() as two:
            await two.grow(70 * MiB)
            assert budget.reserved == 100 * MiB and budget.holders == 2
        assert budget.reserved == 30 * MiB and budget.holders == 1
        one.release()
        one.release()  # idempotent
        assert budget.reserved == 0 and budget.holders == 0
    assert budget.reserved == 0


async def test_a_reservation_that_does_not_fit_waits_then_is_busy() -> None:
    budget = DecoderBudget(100 * MiB, wait=0.2)
    async with budget.reservation() as big:
        await big.grow(90 * MiB)
        async with budget.reservation() as other:
            started = asyncio.get_running_loop().time()
            with pytest.raises(Busy):
                await other.grow(20 * MiB)
            assert asyncio.get_running_loop().time() - started >= 0.19
            assert other.held == 0
            await other.grow(10 * MiB)  # what fits is taken at once
        assert budget.reserved == 90 * MiB
    assert budget.reserved == 0 and budget.holders == 0


async def test_a_waiting_reservation_goes_on_once_another_is_released() -> None:
    budget = DecoderBudget(100 * MiB, wait=5)
    async with budget.reservation() as big:
        await big.grow(90 * MiB)

        async def second() -> int:
            async with budget.reservation() as other:
                await other.grow(50 * MiB)
                return budget.reserved

        waiting = asyncio.create_task(second())
        await asyncio.sleep(0.05)
        assert not waiting.done()
        big.release()
        assert await asyncio.wait_for(waiting, 1) == 50 * MiB
    assert budget.reserved == 0


async def test_more_than_the_whole_budget_is_too_large_at_once() -> None:
    budget = DecoderBudget(100 * MiB, wait=5)
    async with budget.reservation() as one:
        with pytest.raises(TooLarge):
            await asyncio.wait_for(one.grow(101 * MiB), 1)
    assert budget.reserved == 0


async def test_an_upload_gone_while_waiting_holds_nothing() -> None:
    budget = DecoderBudget(100 * MiB, wait=30)
    async with budget.reservation() as big:
        await big.grow(100 * MiB)

        async def waiter() -> None:
            async with budget.reservation() as other:
                await other.grow(MiB)

        task = asyncio.create_task(waiter())
        await asyncio.sleep(0.05)
        task.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await task
        assert budget.reserved == 100 * MiB and not budget._waiters
    assert budget.reserved == 0 and budget.holders == 0


async def test_settle_reserves_what_a_decoder_asks_for() -> None:
    budget = DecoderBudget(100 * MiB, wait=0.1)
    parts: list[bytes] = []
    encoder = Compressor("zstd", parts.append)
    encoder.write(b"x" * 100_000)
    encoder.finish()
    out: list[bytes] = []
    decoder = Decompressor("zstd", out.append, allowance=0)

    async def run(fn, *args):  # type: ignore[no-untyped-def]
        return fn(*args)

    async with budget.reservation() as memory:
        decoder.write(b"".join(parts))
        assert decoder.wants and not out
        await settle(decoder, memory, run)
        assert not decoder.wants and memory.held == budget.reserved > 0
        assert memory.held == zstd_frame_need(2 * MiB)  # level 3, size unknown: 2 MiB window
        decoder.finish()
    assert b"".join(out) == b"x" * 100_000
    assert budget.reserved == 0
