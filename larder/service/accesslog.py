"""Access log: one line per request, in the text or JSON layout, written in batches.

An access logger formats its line itself and hands it either to its ``logging`` logger (as
``aiohttp``'s own logger does) or, when ``larder serve`` gives it a :class:`LineSink`, to a
stream directly. The sink writes every line produced during one turn of the event loop in one
write, each prefixed the way larder configures ``logging`` (``asctime levelname name message``),
so the output is the same as through ``logging`` at a fraction of the cost per request (a
``logging`` record, its formatting and a write per line cost about as much as answering a
cached narinfo). Lines are written before the loop waits for I/O again, so none is held back.

The text layout is aiohttp's default access log format,
``%a %t "%r" %s %b "%{Referer}i" "%{User-Agent}i"``; the JSON layout is one object with
``remote``, ``method``, ``path``, ``status``, ``bytes``, ``seconds`` and ``user_agent``.
Neither ever carries credentials (no ``Authorization``, no query string in JSON).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import time
from dataclasses import dataclass
from typing import ClassVar, TextIO

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

MAX_BATCH = 512


class LineSink:
    """Lines of one logger, written to ``stream`` once per event-loop turn."""

    def __init__(self, stream: TextIO, name: str = "aiohttp.access", level: str = "INFO") -> None:
        self._stream = stream
        self._infix = f" {level} {name} "
        self._lines: list[str] = []
        self._scheduled = False
        self._second = -1
        self._stamp = ""

    def _asctime(self, now: float) -> str:
        """``logging``'s default ``asctime``: local ``YYYY-MM-DD HH:MM:SS,mmm``."""
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self._stamp},{int((now - second) * 1000):03d}"

    def emit(self, message: str) -> None:
        self._lines.append(self._asctime(time.time()) + self._infix + message + "\n")
        if len(self._lines) >= MAX_BATCH:
            self.flush()
            return
        if not self._scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._scheduled = True
            loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if self._lines:
            text = "".join(self._lines)
            self._lines.clear()
            self._stream.write(text)
            self._stream.flush()


@dataclass(frozen=True)
class Entry:
    """What one access log line says about a request and its answer."""

    remote: str | None
    method: str
    path: str  # decoded, without the query
    target: str  # as aiohttp's ``path_qs``
    version: tuple[int, int]
    status: int
    length: int
    seconds: float
    referer: str | None
    user_agent: str | None

    @classmethod
    def of(cls, request: BaseRequest, response: StreamResponse, seconds: float) -> Entry:
        headers = request.headers
        return cls(
            request.remote, request.method, request.path, request.path_qs,
            (request.version.major, request.version.minor), response.status,
            response.body_length, seconds, headers.get("Referer"), headers.get("User-Agent"),
        )  # fmt: skip


class LineAccessLogger(AbstractAccessLogger):
    """Base of larder's access loggers: :meth:`line` says what one request's line is."""

    sink: ClassVar[LineSink | None] = None

    @staticmethod
    def line(entry: Entry) -> str:
        raise NotImplementedError

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        line = self.line(Entry.of(request, response, time))
        if self.sink is not None:
            self.sink.emit(line)
        else:
            self.logger.info(line)

    @classmethod
    def writing_to(cls, sink: LineSink) -> type[LineAccessLogger]:
        """This logger's class, writing to ``sink`` (aiohttp creates the instances itself)."""
        return type(cls.__name__, (cls,), {"sink": sink})


class TextAccessLogger(LineAccessLogger):
    """aiohttp's default line: remote, start time, request line, status, bytes, referer, agent."""

    _stamp: ClassVar[tuple[int, str]] = (-1, "")

    @staticmethod
    def started(seconds_ago: float) -> str:
        """``22/Nov/2026:10:00:00 +0000``: local time of the request's start (per second)."""
        second = int(time.time() - seconds_ago)
        if second != TextAccessLogger._stamp[0]:
            start = datetime.datetime.fromtimestamp(second).astimezone()
            TextAccessLogger._stamp = (second, f"{start:%d/%b/%Y:%H:%M:%S %z}")
        return TextAccessLogger._stamp[1]

    @staticmethod
    def line(entry: Entry) -> str:
        major, minor = entry.version
        return (
            f"{entry.remote or '-'} [{TextAccessLogger.started(entry.seconds)}] "
            f'"{entry.method} {entry.target} HTTP/{major}.{minor}" {entry.status} {entry.length} '
            f'"{entry.referer or "-"}" "{entry.user_agent or "-"}"'
        )


class JsonAccessLogger(LineAccessLogger):
    """One JSON object per request (``access_log = "json"``); never logs credentials."""

    @staticmethod
    def line(entry: Entry) -> str:
        return json.dumps(
            {
                "remote": entry.remote,
                "method": entry.method,
                "path": entry.path,
                "status": entry.status,
                "bytes": entry.length,
                "seconds": round(entry.seconds, 6),
                "user_agent": entry.user_agent or "",
            }
        )
