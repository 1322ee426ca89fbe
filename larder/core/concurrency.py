"""Running many storage calls at once, a bounded number at a time."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar, cast

T = TypeVar("T")
R = TypeVar("R")


async def bounded_map(fn: Callable[[T], Awaitable[R]], items: Iterable[T], limit: int) -> list[R]:
    """``[await fn(item) for item in items]`` with at most ``limit`` calls in flight, results in
    order. The first failure cancels the calls still running and is raised as itself (not as
    an exception group), so domain errors keep their meaning.

    ``limit`` tasks take the items in turn from one iterator: a million items cost ``limit``
    tasks, not a million made in one turn of the event loop (which held every request up for
    seconds while a collection of a large store began)."""
    work = list(items)
    results: list[R | None] = [None] * len(work)
    turns = iter(enumerate(work))

    async def worker() -> None:
        for index, item in turns:
            results[index] = await fn(item)
            await asyncio.sleep(0)  # a call that needed no wait still lets requests through

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(min(limit, len(work))):
                group.create_task(worker())
    except BaseExceptionGroup as failed:
        first = failed.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    return cast("list[R]", results)
