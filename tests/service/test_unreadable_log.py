"""A request aiohttp cannot read costs one INFO line, not an ERROR with a traceback, and is
counted in ``larder_http_requests_total``."""

from __future__ import annotations

import asyncio
import logging
import sys

from aiohttp.http_exceptions import BadHttpMessage

from larder.service.observability.metrics import NO_CACHE
from larder.service.observability.unreadable import LOGGER, OneLineRefusals
from larder.service.state import METRICS
from tests.service.conftest import Live


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _refused(live: Live) -> float:
    registry = live.running.runner.app[METRICS].registry
    labels = {"cache": NO_CACHE, "protocol": "other", "status_class": "4xx"}
    return registry.get_sample_value("larder_http_requests_total", labels) or 0.0


async def test_malformed_heads_are_logged_as_one_info_line(live: Live) -> None:
    logger = logging.getLogger(LOGGER)
    keep, level = _Keep(), logger.level
    before = _refused(live)
    logger.addHandler(keep)
    logger.setLevel(logging.INFO)
    try:
        for head in (
            b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: x\r\n\r\n",
            b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"0" * 9000 + b"\r\n\r\n",
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
            writer.write(head)
            status = await asyncio.wait_for(reader.readline(), 5)
            writer.close()
            assert status.split()[1] == b"400", status
    finally:
        logger.removeHandler(keep)
        logger.setLevel(level)
    assert len(keep.records) == 3
    for record in keep.records:
        assert record.levelno == logging.INFO and record.exc_info is None
        assert "refused (400)" in record.getMessage()
        assert len(record.getMessage()) < 400
    assert "Transfer-Encoding" in keep.records[0].getMessage()
    assert _refused(live) == before + 3
    logger.setLevel(logging.WARNING)  # not logged at all, counted all the same
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
        writer.write(b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(reader.readline(), 5)).split()[1] == b"400"
        writer.close()
    finally:
        logger.setLevel(level)
    assert _refused(live) == before + 4


def _record(exc: BaseException) -> logging.LogRecord:
    try:
        raise exc
    except BaseException:
        info = sys.exc_info()
    return logging.LogRecord(LOGGER, logging.ERROR, __file__, 1, "Error from %s", ("x",), info)


def test_errors_of_the_server_keep_their_level_and_traceback() -> None:
    logger = logging.getLogger(LOGGER)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        kept = _record(RuntimeError("bug"))
        assert OneLineRefusals().filter(kept)
        assert kept.levelno == logging.ERROR and kept.exc_info is not None
        refused = _record(BadHttpMessage("Bad header\n\n  b'quoted bytes'"))
        assert OneLineRefusals().filter(refused)
        assert refused.levelno == logging.INFO and refused.exc_info is None
        assert refused.getMessage() == "Error from x: refused (400): Bad header"
        logger.setLevel(logging.WARNING)  # refusals are INFO: not written at all
        assert not OneLineRefusals().filter(_record(BadHttpMessage("Bad header")))
        assert OneLineRefusals().filter(_record(RuntimeError("bug")))
    finally:
        logger.setLevel(level)
