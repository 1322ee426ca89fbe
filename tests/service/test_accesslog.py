"""Access log: the text line is aiohttp's default line, and the sink batches per loop turn in
the layout logging would write."""

from __future__ import annotations

import asyncio
import io
import logging
from datetime import datetime

from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from aiohttp.web_log import AccessLogger

from larder.service.observability.access_log import FLUSH_DELAY, Entry, LineSink, TextAccessLogger
from larder.service.server import LOG_FORMAT
from tests.service.conftest import capturing_logger


def test_text_line_is_aiohttps_default_line() -> None:
    request = make_mocked_request(
        "GET", "/main/abc.narinfo?x=1", headers={"User-Agent": "Nix/2.8", "Referer": "r"}
    )
    response = web.Response(body=b"x" * 42)
    logger, captured = capturing_logger("larder.test.aiohttp-line")
    AccessLogger(logger).log(request, response, 0.25)
    ours = TextAccessLogger.line(Entry.of(request, response, 0.25))
    assert ours == captured[0]


def test_sink_writes_one_batch_per_flush_delay_in_loggings_layout() -> None:
    writes: list[str] = []

    class Stream(io.StringIO):
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

    sink = LineSink(Stream())

    async def burst() -> None:
        for n in range(3):
            sink.emit(f"line {n}")
        await asyncio.sleep(0)
        sink.emit("line 3")
        assert writes == []  # nothing written at once ...
        await asyncio.sleep(0)
        sink.emit("line 4")
        await asyncio.sleep(FLUSH_DELAY * 2)
        assert len(writes) == 1  # ... then all five in one write, within the delay

    asyncio.run(burst())
    lines = writes[0].splitlines()
    messages = [line.split(" aiohttp.access ", 1)[1] for line in lines]
    assert messages == [f"line {n}" for n in range(5)]
    record = logging.LogRecord("aiohttp.access", logging.INFO, "", 0, "line 0", None, None)
    expected = logging.Formatter(LOG_FORMAT).format(record)
    assert lines[0][23:] == expected[23:]  # same layout after the timestamp
    written, now = (
        datetime.strptime(text[:19], "%Y-%m-%d %H:%M:%S") for text in (lines[0], expected)
    )
    assert 0 <= (now - written).total_seconds() <= 5  # same clock (a second may turn between)


def test_sink_without_a_loop_writes_at_once() -> None:
    stream = io.StringIO()
    LineSink(stream).emit("alone")
    assert stream.getvalue().endswith(" INFO aiohttp.access alone\n")
