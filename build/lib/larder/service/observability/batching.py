"""Work gathered per request and done in batches a short delay later."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


def flush_later(delay: float, flush: Callable[[], None]) -> asyncio.TimerHandle | None:
    """Call ``flush`` in ``delay`` seconds on the running event loop (its handle); without a
    running loop, call it now (``None``)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        flush()
        return None
    return loop.call_later(delay, flush)
