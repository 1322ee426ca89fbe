"""Answers for the requests Nix sends, narinfo, NAR and ``nix-cache-info`` GETs, made before
aiohttp sees them.

:class:`~larder.service.front.connection.FrontProtocol` gives every complete request head it reads
to :class:`FastPath`, which answers it when all of these hold:

* the request line is ``GET /<cache>/<32 nix32 characters>.narinfo HTTP/1.1`` (no query, no
  percent-escapes), or the same with ``HEAD``, which Nix sends to ask whether a path is there
  (answered as the application answers it: no body, and no ``Content-Length`` on a 200);
* the head announces no body (no ``Transfer-Encoding``; ``Content-Length`` absent or 0) and has
  no ``Expect`` or ``Upgrade`` header, nor a ``Connection`` header other than ``keep-alive``;
* whatever its ``Authorization`` header: a writer's lookups are counted apart from readers'
  (:mod:`larder.service.observability.roles`), so the token is verified here, as the
  application verifies it, unless its role for the cache is remembered;
* the cache exists and is public.

The answer comes from the served-narinfo memory (a signed narinfo, or a miss remembered for at
most a second and dropped once any process of the server stored a narinfo) or, when the memory
does not hold it, from the same lookup the application makes (which then remembers it). It is
what the application would send (status, ``Content-Type``, ``Content-Length``, ``Date``,
``Server``, body) and is counted the same way: request, latency, lookup and sent-bytes series,
hit statistics (a miss also remembers its store hash), one access log line, one use of the
narinfo.

Heads come read (:class:`~larder.service.front.heads.Head`, by llhttp under aiohttp's limits); a
head that reader does not take never comes here. Most requests repeat a target answered before, so
the bytes of each answer are kept, per target, beside the cache settings and the remembered body
they were made from (at most :data:`MAX_ANSWERS`). A head whose fields are none of the fields above
and whose target has kept bytes is answered from them while the cache's settings and the
served-narinfo memory still give the very objects the bytes were made from; otherwise the head takes
the full check. Once that question was answered yes for a narinfo, it is not asked again for
:data:`RECHECK` seconds (never past the point where the entry is due for a refresh or the cache's
settings go stale) unless the served-narinfo entry stops being current (replaced, forgotten,
evicted) or the memory of caches changes; so a narinfo answered all the time records one use, and
renews its place in the memory, once per :data:`RECHECK`. Misses are asked about every time.
Counting is batched per few hundredths of a second
(:mod:`larder.service.observability.answer_tally`).

``GET /<cache>/nix-cache-info``, which Nix sends first on a new connection, is answered under
the same conditions when the cache's settings are in memory (otherwise the connection goes to
the application there and then, as it would for any request this path does not take).

A NAR GET (``GET /<cache>/nar/<52 nix32 characters>.nar.zst HTTP/1.1``, the same conditions,
and none of ``Range``, ``If-Range``, ``If-Match``, ``If-None-Match``, ``If-Modified-Since``,
``If-Unmodified-Since``) of a public cache whose blobs are local files is answered here too:
the NAR record and the blob are looked up as the application looks them up, and
:class:`~larder.service.front.connection.FrontProtocol` sends the head this module makes (the
application's status line and headers, ``Etag`` and ``Last-Modified`` as aiohttp derives them)
and then the blob by ``sendfile(2)``. It is counted as the application counts it (a NAR lookup
hit, latency up to the head); once the body is out, the bytes of it that were sent are counted
and it is logged. Anything else (a miss, a storage error, blobs that are not local files) the
application answers.
"""

from __future__ import annotations

import dataclasses
import email.utils
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from larder.core.caches import CacheSettings
from larder.core.nixcache import NixCache, nix_cache_info
from larder.core.servedcache import Entry
from larder.errors import FormatError, LarderError
from larder.protocol.forwarded import client_address
from larder.protocol.names import check_cache_name
from larder.protocol.storepath import check_hash_part
from larder.service import state
from larder.service.front.heads import Head
from larder.service.observability.answer_tally import TallyKey
from larder.service.observability.recording import count_sent_bytes
from larder.service.routes.credentials import could_write
from larder.service.routes.nix_headers import (
    MISS_HEADERS,
    cache_info_headers,
    head_lines,
    nar_headers,
    narinfo_headers,
)
from larder.service.state import HITS, METRICS, TALLY
from larder.storage.base import BlobReader

#: Targets whose answer bytes are kept (all of them are dropped when one more comes).
MAX_ANSWERS = 20_000
#: Seconds for which a kept narinfo is answered without looking at the memories again, while
#: neither changes it; a use of it is recorded, and its place in the memory renewed, once per
#: that.
RECHECK = 1.0

# What the application answers for a narinfo miss: web.HTTPNotFound(headers=MISS_HEADERS).
NOT_FOUND_HEADERS = {**MISS_HEADERS, "Content-Type": "text/plain; charset=utf-8"}
NOT_FOUND_BODY = b"404: Not Found"
#: A narinfo HEAD that finds it: the application's answer has no ``Content-Length``.
_NARINFO_HEAD_HIT = head_lines(200, narinfo_headers(False), None)  # (public caches only)

_TARGET = re.compile(rb"/([^/?%#]+)/([^/?%#]{32})\.narinfo")
_CACHE_INFO_TARGET = re.compile(rb"/([^/?%#]+)/nix-cache-info")
_NAR_TARGET = re.compile(rb"/([^/?%#]+)/nar/([0-9a-z]{52})\.nar\.zst")
_REFUSED_HEADERS = frozenset({b"transfer-encoding", b"expect", b"upgrade"})
#: Fields whose presence or value can make a GET something this path does not answer.
_CHECKED = _REFUSED_HEADERS | {b"content-length", b"connection"}
# What aiohttp's file responses act on (ranges, conditional requests): the application answers.
_NAR_REFUSED_HEADERS = _REFUSED_HEADERS | {
    b"range",
    b"if-range",
    b"if-match",
    b"if-none-match",
    b"if-modified-since",
    b"if-unmodified-since",
}
_SERVER = SERVER_SOFTWARE.encode()

#: The ``Referer`` and ``User-Agent`` of a request as sent, for its access log line.
Logged = tuple[bytes | None, bytes | None]
#: Formats the access log line of an answer: remote, method, target, status, length, seconds,
#: referer, user agent.
LogLine = Callable[[str | None, str, str, int, int, float, str | None, str | None], str]


@dataclass(frozen=True, slots=True)
class AccessLog:
    """Where this path's access log lines go: ``line`` formats one, ``emit`` writes it.
    ``timed``: a line states the request's duration; otherwise it states the second the request
    began, so an answer repeated within that second to the same peer and client has the same
    line, which is then formatted once."""

    line: LogLine
    emit: Callable[[str], None]
    timed: bool


_NOT_HELD = Entry("", None, 0.0, (0, None), 0.0)
_NOT_HELD.current = False


class _Answer:
    """The bytes answering one target, and what they were made from."""

    __slots__ = (
        "body",
        "cache",
        "caches_seen",
        "checked_until",
        "entry",
        "head",
        "log_key",
        "log_text",
        "payload",
        "response",
        "second",
        "served",
        "settings",
        "status",
        "store_hash",
        "tally_key",
        "target",
        "writer_tally_key",
    )

    def __init__(
        self, target: str, settings: CacheSettings, store_hash: str, body: bytes | None
    ) -> None:
        self.target = target
        self.cache = settings.name
        self.settings = settings
        self.store_hash = store_hash
        self.body = body
        if body is None:
            status, headers, body = 404, NOT_FOUND_HEADERS, NOT_FOUND_BODY
        else:
            status, headers = 200, narinfo_headers(settings.private)
        self.status = status
        self.payload = body  # what is sent: the narinfo, or the 404's text
        self.head = head_lines(status, headers, len(body))
        self.second = -1
        self.response = b""
        self.served = NixCache.served_keys(settings, store_hash)
        hit = self.body is not None
        self.tally_key: TallyKey = (self.cache, "nix", status, "narinfo", hit, False)
        self.writer_tally_key: TallyKey = (*self.tally_key[:5], True)
        #: The access log line last written for this answer, and what it was made from.
        self.log_key: tuple[object, ...] = ()
        self.log_text = ""
        #: Until ``checked_until`` (``time.monotonic()``) the memories need not be asked again
        #: while the served entry stays current and the caches' memory at ``caches_seen``.
        self.checked_until = 0.0
        self.entry = _NOT_HELD
        self.caches_seen = -1


class FastPath:
    """Answers qualifying request heads for one application (see the module docstring)."""

    def __init__(self, app: web.Application, log: AccessLog | None) -> None:
        self._app = app
        self._caches = app[state.CACHES]
        self._nix = app[state.NIX]
        self._log = log
        self._tally = app[TALLY]
        self._roles = app[state.ROLES]
        self._answers: dict[bytes, _Answer] = {}
        self._second = -1
        self._date_line = b""
        self._local_blobs = True  # until a blob turns out not to be a local file
        self._trusted = app[state.CONFIG].trusted_proxy_networks

    def client(self, head: Head, peer: str | None) -> str | None:
        """The address of the client sending ``head`` over a connection from ``peer``: the one
        trusted proxies name in ``X-Forwarded-For`` (:mod:`larder.protocol.forwarded`)."""
        if not self._trusted:
            return peer
        forwarded = head.fields.get(b"x-forwarded-for")
        text = forwarded.decode("latin-1") if forwarded is not None else None
        return client_address(peer, text, self._trusted)

    def _http_date_line(self, second: int) -> bytes:
        if second != self._second:
            self._second = second
            date = email.utils.formatdate(second, usegmt=True).encode()
            self._date_line = b"Date: %s\r\nServer: %s\r\n\r\n" % (date, _SERVER)
        return self._date_line

    def kept(self, target: bytes) -> bool:
        """Whether answer bytes are kept for ``target``."""
        return target in self._answers

    def _writer(self, credentials: bytes | None, cache: str) -> bool | None:
        """Whether the request's ``Authorization`` value could write to ``cache`` (``False``
        without one); ``None`` if not remembered (:meth:`_find_writer` finds out)."""
        if credentials is None:
            return False
        return self._roles.writer(_header_text(credentials), cache)

    async def _find_writer(self, credentials: bytes | None, settings: CacheSettings) -> bool:
        """Whether ``credentials`` could write to the cache (remembered, else verified)."""
        if credentials is None:
            return False
        tokens = self._app[state.TOKENS]
        return await could_write(tokens, self._roles, _header_text(credentials), settings)

    def quick(self, head: Head, peer: str | None) -> bytes | None:
        """The answer to ``head`` from kept bytes, or ``None``: then :meth:`parse` decides."""
        start = time.monotonic()
        answer = self._answers.get(head.target)
        if answer is None or head.method != b"GET":
            return None
        fields = head.fields
        if not _CHECKED.isdisjoint(fields) and not _plain(fields, _REFUSED_HEADERS):
            return None
        writer = self._writer(fields.get(b"authorization"), answer.cache)
        if writer is None:
            return None
        logged = _logged_fields(fields)
        if (
            start >= answer.checked_until
            or not answer.entry.current
            or answer.caches_seen != self._caches.version
            or not self._nix.served_unchanged(answer.entry)  # stored again by another worker
        ) and not self._still_good(answer, start):
            return None
        return self._finish(answer, start, peer, logged, writer)

    def _still_good(self, answer: _Answer, now: float) -> bool:
        """Whether the memories still give what ``answer`` was made from (a use of it counts);
        if so, and it is a narinfo, let :data:`RECHECK` seconds of repeats skip the question."""
        settings = self._caches.known(answer.cache)
        if settings is not answer.settings:
            return False
        known, body = self._nix.served_by(settings, answer.served)
        if not known or body is not answer.body:
            return False
        held = self._nix.served_hold(answer.served) if body is not None else None
        if held is not None:  # misses are asked about every time (writes in other processes)
            answer.entry, seconds = held
            answer.caches_seen = self._caches.version
            answer.checked_until = now + min(RECHECK, seconds, self._caches.fresh_for(answer.cache))
        return True

    def parse(self, head: Head, peer: str | None) -> NarinfoGet | None:
        """The request ``head`` if this path may answer it."""
        parsed = _plain_request(head, _TARGET, _REFUSED_HEADERS, head_too=True)
        if parsed is None:
            return None
        method, cache, match, target, logged = parsed
        try:
            store_hash = check_hash_part(match.group(2).decode("ascii"))
        except (FormatError, UnicodeDecodeError):
            return None
        credentials = head.fields.get(b"authorization")
        return NarinfoGet(
            cache,
            store_hash,
            target,
            peer,
            logged,
            time.monotonic(),
            method == b"HEAD",
            self._writer(credentials, cache),
            credentials,
        )

    def cache_info(self, head: Head, peer: str | None) -> bytes | None:
        """The answer to ``head`` if it is a ``nix-cache-info`` GET this path may answer."""
        start = time.monotonic()
        parsed = _plain_request(head, _CACHE_INFO_TARGET, _REFUSED_HEADERS)
        if parsed is None:
            return None
        _, name, _, target, logged = parsed
        settings = self._caches.known(name)
        if settings is None or settings.private:
            return None
        body = nix_cache_info(settings)
        lines = head_lines(200, cache_info_headers(False), len(body))
        response = lines + self._http_date_line(int(time.time())) + body
        self._app[METRICS].add_cache(settings.name)
        seconds = time.monotonic() - start
        self._tally.add(settings.name, "nix", 200, seconds, len(body))
        if self._log is not None:
            self._write_log(peer, "GET", target, 200, len(response), seconds, logged)
        return response

    def parse_nar(self, head: Head, peer: str | None) -> NarGet | None:
        """The request ``head`` if it is a NAR GET this path may answer (module docstring)."""
        if not self._local_blobs:
            return None
        parsed = _plain_request(head, _NAR_TARGET, _NAR_REFUSED_HEADERS)
        if parsed is None:
            return None
        _, cache, match, target, logged = parsed
        nar_hash = match.group(2).decode("ascii")
        credentials = head.fields.get(b"authorization")
        return NarGet(cache, nar_hash, target, peer, logged, time.monotonic(), credentials)

    async def open_nar(self, request: NarGet) -> OpenNar | None:
        """The NAR's blob, open, with the head to send before it; ``None`` if the application
        must answer (no such cache or NAR, a private cache, an error, blobs not local files)."""
        metrics = self._app[METRICS]
        metrics.in_flight.inc()
        reader: BlobReader | None = None
        try:
            settings = await self._caches.get(request.cache)
            if settings is None or settings.private:
                return None
            writer = await self._find_writer(request.credentials, settings)
            record = await self._nix.nar_record(settings, request.nar_hash, serving=True)
            if record is None:
                return None
            reader = await self._nix.open_blob(record.blob_id)
            if reader is None:
                return None
            fd = reader.fileno()
            if fd is None:
                self._local_blobs = False  # this storage's blobs are not local files
                return None
            stat = os.fstat(fd)
            if stat.st_size != record.stored_size:
                return None  # damaged, or stored again otherwise: the application checks it
            head = _nar_head(stat) + self._http_date_line(int(time.time()))
            opened = OpenNar(reader, fd, stat.st_size, head, settings.name, writer)
            reader = None  # the caller closes it now
            metrics.add_cache(settings.name)
            return opened
        except (LarderError, OSError):
            return None  # the application answers again, with its status for the error
        finally:
            metrics.in_flight.dec()
            if reader is not None:
                await reader.close()

    def nar_started(self, request: NarGet, nar: OpenNar) -> None:
        """The head is out: count the answer as the application would (latency to the head);
        its body's bytes are counted once they are out (:meth:`nar_sent`)."""
        seconds = time.monotonic() - request.start
        self._tally.add(nar.cache, "nix", 200, seconds, 0, "nar", True, nar.writer)

    def nar_sent(self, request: NarGet, nar: OpenNar, sent: int) -> None:
        """The body is out (``sent`` bytes of it, all unless the transfer failed): count those
        bytes as sent and log it."""
        if sent:
            count_sent_bytes(self._app, nar.cache, "nix", sent)
        if self._log is not None:
            seconds = time.monotonic() - request.start
            self._write_log(
                request.peer,
                "GET",
                request.path,
                200,
                len(nar.head) + sent,
                seconds,
                request.logged,
            )

    @property
    def send_idle(self) -> float:
        """Seconds a NAR transfer may go without progress (``body_idle_timeout``)."""
        return self._app[state.CONFIG].body_idle_timeout

    def answer_now(self, request: NarinfoGet) -> bytes | Literal[False] | None:
        """The response from memory alone; ``None`` if unknown here (try :meth:`answer_later`);
        ``False`` if the application must answer (a private cache)."""
        settings = self._caches.known(request.cache)
        if settings is None:
            return None
        if settings.private:
            return False
        if request.writer is None:
            return None  # the token is verified first
        known, body = self._nix.served_narinfo(settings, request.store_hash)
        return self._respond(request, settings, body) if known else None

    async def answer_later(self, request: NarinfoGet) -> bytes | None:
        """The response after looking the cache and the narinfo up (and remembering them);
        ``None`` if the application must answer (no such cache, private, or an error)."""
        metrics = self._app[METRICS]
        metrics.in_flight.inc()
        try:
            settings = await self._caches.get(request.cache)
            if settings is None or settings.private:
                return None
            if request.writer is None:
                writer = await self._find_writer(request.credentials, settings)
                request = dataclasses.replace(request, writer=writer)
            body = await self._nix.get_narinfo(settings, request.store_hash)
        except LarderError:
            return None  # the application answers again, with its status for the error
        finally:
            metrics.in_flight.dec()
        return self._respond(request, settings, body)

    def _respond(self, request: NarinfoGet, settings: CacheSettings, body: bytes | None) -> bytes:
        answer = _Answer(request.path, settings, request.store_hash, body)
        if len(self._answers) >= MAX_ANSWERS:
            self._answers.clear()
        self._answers[request.path.encode("ascii")] = answer
        self._app[METRICS].add_cache(settings.name)
        logged, writer = request.logged, bool(request.writer)
        if request.head_only:
            return self._finish_head(answer, request.start, request.peer, logged, writer)
        return self._finish(answer, request.start, request.peer, logged, writer)

    def _finish(
        self,
        answer: _Answer,
        start: float,
        peer: str | None,
        logged: Logged,
        writer: bool,
    ) -> bytes:
        now = time.time()
        second = int(now)
        if answer.second != second:
            answer.second = second
            answer.response = b"".join((answer.head, self._http_date_line(second), answer.payload))
        response = answer.response
        seconds = time.monotonic() - start
        if answer.body is None and not writer:  # `nix copy` asks for what it is about to push
            self._app[HITS].missed_store_hash(answer.cache, answer.store_hash)
        tally_key = answer.writer_tally_key if writer else answer.tally_key
        self._tally.add_to(tally_key, seconds, len(answer.payload))
        log = self._log
        if log is not None:
            if log.timed:
                self._write_log(
                    peer, "GET", answer.target, answer.status, len(response), seconds, logged
                )
                return response
            key = (int(now - seconds), peer, logged, len(response))
            if answer.log_key != key:
                answer.log_key = key
                referer, agent = _text(logged)
                answer.log_text = log.line(
                    peer,
                    "GET",
                    answer.target,
                    answer.status,
                    len(response),
                    seconds,
                    referer,
                    agent,
                )
            log.emit(answer.log_text)
        return response

    def _finish_head(
        self,
        answer: _Answer,
        start: float,
        peer: str | None,
        logged: Logged,
        writer: bool,
    ) -> bytes:
        """A HEAD's answer, as the application gives it: no body, and no ``Content-Length`` for
        a narinfo that is there (the 404's length is its text's)."""
        hit = answer.body is not None
        head = answer.head
        if hit:
            head = _NARINFO_HEAD_HIT
        response = head + self._http_date_line(int(time.time()))
        seconds = time.monotonic() - start
        if not hit and not writer:
            self._app[HITS].missed_store_hash(answer.cache, answer.store_hash)
        self._tally.add(answer.cache, "nix", answer.status, seconds, 0, "narinfo", hit, writer)
        if self._log is not None:
            self._write_log(
                peer, "HEAD", answer.target, answer.status, len(response), seconds, logged
            )
        return response

    def _write_log(
        self,
        peer: str | None,
        method: str,
        target: str,
        status: int,
        length: int,
        seconds: float,
        logged: Logged,
    ) -> None:
        if self._log is not None:
            referer, agent = _text(logged)
            self._log.emit(
                self._log.line(peer, method, target, status, length, seconds, referer, agent)
            )

    def flush(self) -> None:
        """Count every answer made so far (the server is stopping)."""
        self._tally.flush()


def _plain(fields: dict[bytes, bytes], refused: frozenset[bytes]) -> bool:
    """Whether ``fields`` announce no body (``Content-Length`` absent or 0), none of
    ``refused``, and no ``Connection`` other than ``keep-alive``."""
    if not refused.isdisjoint(fields):
        return False
    length = fields.get(b"content-length")
    connection = fields.get(b"connection")
    return (length is None or length == b"0") and (
        connection is None or connection.lower() == b"keep-alive"
    )


def _plain_request(
    head: Head, pattern: re.Pattern[bytes], refused: frozenset[bytes], head_too: bool = False
) -> tuple[bytes, str, re.Match[bytes], str, Logged] | None:
    """``(method, cache, match, target, (referer, user agent))`` of a ``GET`` head (or
    ``HEAD``, with ``head_too``) whose target matches ``pattern``, its first group a valid cache
    name, and whose fields are :func:`_plain`."""
    method = head.method
    if not (method == b"GET" or (head_too and method == b"HEAD")):
        return None
    match = pattern.fullmatch(head.target)
    if match is None or not _plain(head.fields, refused):
        return None
    try:
        cache = check_cache_name(match.group(1).decode("ascii"))
        target = head.target.decode("ascii")
    except (FormatError, UnicodeDecodeError):
        return None
    return method, cache, match, target, _logged_fields(head.fields)


def _nar_head(stat: os.stat_result) -> bytes:
    """The status line and headers before ``Date`` that aiohttp's file response sends for a
    whole blob file."""
    etag = f'"{stat.st_mtime_ns:x}-{stat.st_size:x}"'
    modified = email.utils.formatdate(math.ceil(stat.st_mtime), usegmt=True)  # as aiohttp does
    headers = {
        "Accept-Ranges": "bytes",
        **nar_headers(False),
        "Etag": etag,
        "Last-Modified": modified,
    }
    return head_lines(200, headers, stat.st_size)


def _logged_fields(fields: dict[bytes, bytes]) -> Logged:
    """The ``Referer`` and ``User-Agent`` of a head, for the access log."""
    return fields.get(b"referer"), fields.get(b"user-agent")


def _header_text(value: bytes) -> str:
    """A field value as aiohttp gives it to the application (UTF-8, other bytes escaped)."""
    return value.decode("utf-8", "surrogateescape")


def _text(logged: Logged) -> tuple[str | None, str | None]:
    referer, agent = logged
    return (
        None if referer is None else referer.decode("latin-1"),
        None if agent is None else agent.decode("latin-1"),
    )


@dataclass(frozen=True, slots=True)
class NarGet:
    """A NAR GET this path may answer."""

    cache: str
    nar_hash: str
    path: str
    peer: str | None
    logged: Logged  # referer and user agent, for the access log
    start: float
    credentials: bytes | None = None  # its Authorization value


@dataclass(frozen=True, slots=True)
class OpenNar:
    """A NAR about to be sent: its open blob (``fd`` is the reader's) and response head."""

    reader: BlobReader
    fd: int
    size: int
    head: bytes
    cache: str
    writer: bool = False  # the request's credentials could write to the cache

    async def close(self) -> None:
        await self.reader.close()


@dataclass(frozen=True, slots=True)
class NarinfoGet:
    """A request this path may answer."""

    cache: str
    store_hash: str
    path: str
    peer: str | None
    logged: Logged  # referer and user agent, for the access log
    start: float
    head_only: bool = False  # HEAD: the answer has no body
    #: Whether its credentials could write to the cache (None: not known yet, verified first).
    writer: bool | None = False
    credentials: bytes | None = None  # its Authorization value
