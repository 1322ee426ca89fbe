"""Requests aiohttp cannot read, logged as one line each.

aiohttp answers a request it cannot parse (a malformed head, a ``Transfer-Encoding`` it does not
know, a field over its limits) with 400 and logs it at ERROR with a traceback that quotes the
offending bytes. That is the client's fault, and anyone can send it: :class:`OneLineRefusals`
turns such a record into one INFO line (``... refused (400): <aiohttp's reason>``) on the
``aiohttp.server`` logger, so a scanner cannot fill the error log or trip an alert on it, and
counts it (:func:`install`'s ``counted``: ``larder_http_requests_total`` without a cache, as no
handler saw it). Errors of the server itself keep their level and traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp.http_exceptions import HttpProcessingError

LOGGER = "aiohttp.server"
#: The most of aiohttp's reason a line keeps (some quote the request's bytes).
MAX_REASON = 200


class OneLineRefusals(logging.Filter):
    """Rewrites records of client-side parse errors (status below 500) as one INFO line."""

    def __init__(self) -> None:
        super().__init__()
        #: Told each refusal's status, whatever the log level.
        self.counted: Callable[[int], None] | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError) or not 400 <= (exc.code or 500) < 500:
            return True
        if self.counted is not None:
            self.counted(exc.code)
        if not logging.getLogger(LOGGER).isEnabledFor(logging.INFO):
            return False
        try:
            reason = (exc.message.strip().splitlines() or [""])[0].rstrip(":")[:MAX_REASON]
            said = record.getMessage()
        except Exception:  # a record this filter cannot read is left as it came
            return True
        record.msg, record.args = "%s: refused (%d): %s", (said, exc.code, reason)
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info = record.exc_text = None
        return True


def install(counted: Callable[[int], None] | None = None) -> None:
    """Attach :class:`OneLineRefusals` to aiohttp's server logger (once); ``counted`` is told
    each refusal's status (the application this process serves counts it)."""
    logger = logging.getLogger(LOGGER)
    found = [existing for existing in logger.filters if isinstance(existing, OneLineRefusals)]
    refusals = found[0] if found else OneLineRefusals()
    if not found:
        logger.addFilter(refusals)
    refusals.counted = counted
