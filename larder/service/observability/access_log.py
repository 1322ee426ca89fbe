"""Access log: one line per request, in the text or JSON layout, written in batches.

An access logger formats its line itself and hands it either to its ``logging`` logger (as
``aiohttp``'s own logger does) or, when ``larder serve`` gives it a :class:`LineSink`, to a
stream directly. The sink writes the lines gathered over at most :data:`FLUSH_DELAY` seconds (or
:data:`MAX_BATCH` lines) in one write, text lines prefixed the way larder configures ``logging``
(``asctime levelname name message``), so the output is the same as through ``logging`` at a
fraction of the cost per request (a ``logging`` record, its formatting and a write per line cost
about as much as answering a cached narinfo). Whatever is left is written when the server stops.

The text layout is aiohttp's default access log format,
``%a %t "%r" %s %b "%{Referer}i" "%{User-Agent}i"``; the JSON layout is one object with
``time`` (when the answer was logged, RFC 3339 in UTC to the millisecond), ``remote``,
``method``, ``path``, ``status``, ``bytes``, ``seconds`` and ``user_agent``, written alone on its
line (JSON lines: no ``logging`` prefix). Neither ever carries credentials (no
``Authorization``, no query string in JSON).
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

from larder.protocol.forwarded import Network, client_address
from larder.service.observability.batching import flush_later

MAX_BATCH = 512
FLUSH_DELAY = 0.05


class LineSink:
    """Lines of one logger, written to ``stream`` in batches (see the module docstring)."""

    def __init__(
        self,
        stream: TextIO,
        name: str = "aiohttp.access",
        level: str = "INFO",
        *,
        prefixed: bool = True,
    ) -> None:
        """``prefixed``: each line starts as ``logging`` would start it; else it is the message
        alone (JSON lines)."""
        self._stream = stream
        self._prefixed = prefixed
        self._infix = f" {level} {name} "
        self._lines: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._stamp = ""
        self._millisecond = -1
        self._prefix = ""

    def _line_prefix(self, millisecond: int) -> str:
        """``asctime levelname name `` as ``logging`` writes them (``asctime`` is local
        ``YYYY-MM-DD HH:MM:SS,mmm``) for ``millisecond`` since the epoch."""
        self._millisecond = millisecond
        second = millisecond // 1000
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        self._prefix = f"{self._stamp},{millisecond % 1000:03d}{self._infix}"
        return self._prefix

    def emit(self, message: str) -> None:
        lines = self._lines
        if self._prefixed:
            millisecond = int(time.time() * 1000)
            prefix = self._prefix
            if millisecond != self._millisecond:
                prefix = self._line_prefix(millisecond)
            lines.append(prefix + message + "\n")
        else:
            lines.append(message + "\n")
        if len(lines) >= MAX_BATCH:
            self.flush()
        elif self._timer is None:
            self._timer = flush_later(FLUSH_DELAY, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
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
    def of(
        cls,
        request: BaseRequest,
        response: StreamResponse,
        seconds: float,
        trusted: tuple[Network, ...] = (),
    ) -> Entry:
        """``trusted``: the proxies whose ``X-Forwarded-For`` names the client."""
        headers = request.headers
        forwarded = ",".join(headers.getall("X-Forwarded-For", ())) if trusted else None
        return cls(
            client_address(request.remote, forwarded, trusted),
            request.method,
            request.path,
            request.path_qs,
            (request.version.major, request.version.minor),
            response.status,
            response.body_length,
            seconds,
            headers.get("Referer"),
            headers.get("User-Agent"),
        )


class LineAccessLogger(AbstractAccessLogger):
    """Base of larder's access loggers: :meth:`line` says what one request's line is."""

    sink: ClassVar[LineSink | None] = None
    #: Proxies whose ``X-Forwarded-For`` names the client (``trusted_proxies``).
    trusted: ClassVar[tuple[Network, ...]] = ()
    #: Whether a line states the request's duration
    #: (:class:`~larder.service.front.short_path.AccessLog`).
    timed: ClassVar[bool] = True

    @staticmethod
    def line(entry: Entry) -> str:
        raise NotImplementedError

    @classmethod
    def get_line(
        cls,
        remote: str | None,
        method: str,
        target: str,
        status: int,
        length: int,
        seconds: float,
        referer: str | None,
        user_agent: str | None,
    ) -> str:
        """The line of an HTTP/1.1 ``method target`` answered outside aiohttp (the short
        path)."""
        entry = Entry(
            remote, method, target, target, (1, 1), status, length, seconds, referer, user_agent
        )
        return cls.line(entry)

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        line = self.line(Entry.of(request, response, time, self.trusted))
        if self.sink is not None:
            self.sink.emit(line)
        else:
            self.logger.info(line)

    @classmethod
    def writing_to(
        cls, sink: LineSink, trusted: tuple[Network, ...] = ()
    ) -> type[LineAccessLogger]:
        """This logger's class, writing to ``sink`` and believing ``trusted`` proxies (aiohttp
        creates the instances itself)."""
        return type(cls.__name__, (cls,), {"sink": sink, "trusted": trusted})


class TextAccessLogger(LineAccessLogger):
    """aiohttp's default line: remote, start time, request line, status, bytes, referer, agent."""

    timed: ClassVar[bool] = False  # the start second, not the duration

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
        return TextAccessLogger._text(
            entry.remote,
            f"{entry.method} {entry.target} HTTP/{major}.{minor}",
            entry.status,
            entry.length,
            entry.seconds,
            entry.referer,
            entry.user_agent,
        )

    @classmethod
    def get_line(
        cls,
        remote: str | None,
        method: str,
        target: str,
        status: int,
        length: int,
        seconds: float,
        referer: str | None,
        user_agent: str | None,
    ) -> str:
        started = TextAccessLogger._stamp  # what started() gives, without the call when fresh
        if int(time.time() - seconds) != started[0]:
            started = (0, TextAccessLogger.started(seconds))
        return (
            f'{remote or "-"} [{started[1]}] "{method} {target} HTTP/1.1" {status} {length} '
            f'"{referer or "-"}" "{user_agent or "-"}"'
        )

    @staticmethod
    def _text(
        remote: str | None,
        request_line: str,
        status: int,
        length: int,
        seconds: float,
        referer: str | None,
        user_agent: str | None,
    ) -> str:
        return (
            f'{remote or "-"} [{TextAccessLogger.started(seconds)}] "{request_line}" {status} '
            f'{length} "{referer or "-"}" "{user_agent or "-"}"'
        )


class JsonAccessLogger(LineAccessLogger):
    """One JSON object per request (``access_log = "json"``); never logs credentials."""

    _second: ClassVar[tuple[int, str]] = (-1, "")

    @staticmethod
    def now() -> str:
        """``2026-11-22T10:00:00.123Z``: the current time in UTC (RFC 3339)."""
        millisecond = int(time.time() * 1000)
        second, fraction = divmod(millisecond, 1000)
        if second != JsonAccessLogger._second[0]:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            JsonAccessLogger._second = (second, stamp)
        return f"{JsonAccessLogger._second[1]}.{fraction:03d}Z"

    @staticmethod
    def line(entry: Entry) -> str:
        return json.dumps(
            {
                "time": JsonAccessLogger.now(),
                "remote": entry.remote,
                "method": entry.method,
                "path": entry.path,
                "status": entry.status,
                "bytes": entry.length,
                "seconds": round(entry.seconds, 6),
                "user_agent": entry.user_agent or "",
            }
        )
