"""bounded_map: results in order, at most ``limit`` calls at once, the first failure raised as
itself, and a long list never made into one task per item."""

from __future__ import annotations

import asyncio

import pytest

from larder.core.concurrency import bounded_map


async def test_results_come_in_order_with_at_most_limit_calls_in_flight() -> None:
    running = peak = 0

    async def slow_double(n: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.001 * (n % 3))
        running -= 1
        return 2 * n

    assert await bounded_map(slow_double, range(50), 4) == [2 * n for n in range(50)]
    assert peak == 4
    assert await bounded_map(slow_double, [], 4) == []


async def test_the_first_failure_is_raised_as_itself() -> None:
    async def fail_on_seven(n: int) -> int:
        if n == 7:
            raise KeyError(n)
        await asyncio.sleep(0)
        return n

    with pytest.raises(KeyError):
        await bounded_map(fail_on_seven, range(20), 3)


async def test_a_long_list_costs_limit_tasks_and_leaves_the_loop_turning() -> None:
    """A collection of a large store maps over every object: one task per item, all made in
    one turn of the loop, held every request up for seconds (21 s for a million)."""
    baseline = len(asyncio.all_tasks())
    most = 0
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    async def cheap(n: int) -> int:
        nonlocal most
        most = max(most, len(asyncio.all_tasks()) - baseline)
        return n

    beat = asyncio.create_task(ticker())
    try:
        assert await bounded_map(cheap, range(5_000), 8) == list(range(5_000))
    finally:
        beat.cancel()
    assert most <= 8 + 1  # the workers, and the ticker
    assert ticks > 500  # other work ran between the calls, none of which had to wait
