"""Reading request heads outside aiohttp: llhttp (httptools), with aiohttp's own checks.

:class:`HeadReader` is fed every byte a connection receives, in the pieces it arrives in, by a
strict llhttp parser (the parser family under aiohttp's C reader, in the same mode). A piece is
*refused* when aiohttp's reader would refuse it (and answer 400, RFC 9112): llhttp's own errors
(a field name with a space or control byte before the colon, a bare CR or LF, ...) and the
checks aiohttp adds: a request target in none of the forms it reads (``GET *x``, ``GET x``),
a request line or a field (name and value) over :data:`MAX_LINE` bytes, more than
:data:`MAX_FIELDS` fields, a field aiohttp allows once (``Host``, ``Content-Length``,
``Transfer-Encoding``, ...) repeated, a NUL in a value, an ``HTTP/1.1`` request without
``Host``. After a refused piece the reader is spent and the connection goes to
aiohttp with every byte not answered yet, the refused piece included, so aiohttp refuses it too.

Every request head completed in the bytes fed so far is queued in :attr:`HeadReader.heads`, in
order (past :data:`MAX_KEPT` waiting, as :data:`AGAIN`: read again with :meth:`HeadReader.again`
when its turn comes, so a long pipeline holds its bytes and not their reading):
its :class:`Head`, or ``None`` when the short path must not answer it (not ``HTTP/1.1``, a
body, or a field named twice). A request with no body ends at its first empty line, so the
caller finds its bytes by the first ``CRLF CRLF`` (unless they begin with empty lines, which
llhttp skips: the caller hands those to aiohttp).
"""

from __future__ import annotations

import re
from collections import deque
from typing import NamedTuple

import httptools
from yarl import URL

#: The longest request line, and the longest field (name and value), aiohttp reads
#: (``max_line_size``, ``max_field_size``).
MAX_LINE = 8190
#: The most fields a request may have (aiohttp's ``max_headers``).
MAX_FIELDS = 128
#: The longest head the short path reads; a longer one goes to aiohttp.
MAX_HEAD = 8192
#: The end of a head.
END = b"\r\n\r\n"
#: Heads kept read in :attr:`HeadReader.heads`; later ones are queued as :data:`AGAIN`.
MAX_KEPT = 32
#: Fields aiohttp refuses to see twice in a request (``aiohttp.http_parser.SINGLETON_HEADERS``).
SINGLETONS = frozenset(
    {
        b"content-length",
        b"content-location",
        b"content-range",
        b"content-type",
        b"etag",
        b"host",
        b"max-forwards",
        b"server",
        b"transfer-encoding",
        b"user-agent",
    }
)


#: A ``Host`` field value (RFC 9112 §3.2, RFC 3986 §3.2.2): an IP literal, or a name of
#: unreserved, percent-encoded and sub-delimiter characters (empty included), then an optional
#: port. A request with any other value is answered 400.
HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(?::[0-9]{0,5})?")


def valid_host(value: bytes) -> bool:
    """Whether ``value`` is a ``Host`` field value (:data:`HOST`) with a port up to 65535."""
    if HOST.fullmatch(value) is None:
        return False
    _, colon, port = value.rpartition(b":")
    return not colon or value.endswith(b"]") or not port or int(port) <= 65535


class Head(NamedTuple):
    """A request head: method, target as sent, and fields by lower-case name (values without
    the whitespace around them)."""

    method: bytes
    target: bytes
    fields: dict[bytes, bytes]


#: A head queued without its reading (:meth:`HeadReader.again` reads it when its turn comes).
AGAIN = Head(b"", b"", {})


def _has_authority(target: str) -> bool:
    """Whether an absolute-form target has ``//`` and a non-empty authority (as aiohttp checks
    since 3.14.x; where the installed aiohttp takes more, refusing here only hands the piece to
    it whole, which answers it as it would anyway)."""
    rest = target.partition(":")[2]
    return rest[:2] == "//" and rest[2:3] not in ("", "/", "?", "#")


def _target_read(method: bytes, target: bytes) -> bool:
    """Whether aiohttp's reader takes ``target`` as a request target (RFC 9112 §3.2): origin
    form (``/...``), ``*`` for ``OPTIONS``, authority form for ``CONNECT``, else absolute form
    with a host. It refuses any other with 400, and with it every request read from the same
    piece (so must this reader: answering those would differ)."""
    if target[:1] == b"/":
        return True
    text = target.decode("utf-8", "surrogateescape")
    try:
        if method == b"CONNECT":
            return URL.build(authority=text, encoded=True).raw_host is not None
        if text == "*" and method == b"OPTIONS":
            return True
        return _has_authority(text) and URL(text, encoded=True).raw_host is not None
    except ValueError:
        return False


class _Refused(Exception):
    """aiohttp's reader refuses the request being read."""


class HeadReader:
    """One connection's llhttp parser and the requests it completed (module docstring)."""

    __slots__ = ("_count", "_fields", "_fit", "_parser", "_target", "good", "heads")

    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        #: The requests completed and not taken yet, in order (``None``: not for the short path).
        self.heads: deque[Head | None] = deque()
        #: False once a piece was refused.
        self.good = True
        self._fields: dict[bytes, bytes] = {}
        self._target = b""
        self._count = 0
        self._fit = True

    @staticmethod
    def again(data: bytes) -> Head | None:
        """``data``, the bytes of a head queued as :data:`AGAIN`, read again (between requests,
        so the same way as when it was fed)."""
        reader = HeadReader()
        reader.feed(data)
        return reader.heads[0] if reader.good and len(reader.heads) == 1 else None

    def feed(self, data: bytes) -> bool:
        """Read ``data``, the next bytes of the connection; ``False`` if they are refused."""
        if self.good:
            try:
                self._parser.feed_data(data)
            except (httptools.HttpParserError, httptools.HttpParserUpgrade):
                self.good = False  # an upgrade (or CONNECT) too: aiohttp answers it
        return self.good

    # llhttp's callbacks (a request's state is reset when its head is complete)

    def on_url(self, url: bytes) -> None:
        self._target += url
        if len(self._target) > MAX_LINE:
            raise _Refused("request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) + len(value) > MAX_LINE:
            raise _Refused("field too long")
        if b"\0" in value:
            raise _Refused("NUL in a field value")
        self._count += 1
        if self._count > MAX_FIELDS:
            raise _Refused("too many fields")
        key = name.lower()
        fields = self._fields
        if key in fields:
            if key in SINGLETONS:
                raise _Refused("field repeated")
            self._fit = False
        fields[key] = value.rstrip(b" \t")

    def on_headers_complete(self) -> None:
        parser = self._parser
        if not _target_read(parser.get_method(), self._target):
            raise _Refused("request target aiohttp does not read")
        fields = self._fields
        version = parser.get_http_version()
        if version == "1.1" and b"host" not in fields:
            raise _Refused("no Host")
        length = fields.get(b"content-length")
        if len(self.heads) >= MAX_KEPT:
            self.heads.append(AGAIN)
        elif (
            not self._fit
            or not valid_host(fields.get(b"host", b""))  # aiohttp answers it (400)
            or version != "1.1"
            or b"transfer-encoding" in fields
            or (length is not None and length != b"0")
        ):
            self.heads.append(None)  # a body follows, or the short path does not answer it
        else:
            self.heads.append(Head(parser.get_method(), self._target, fields))
        self._fields = {}
        self._target = b""
        self._count = 0
        self._fit = True
