"""Reading a request head outside aiohttp: llhttp (httptools), with aiohttp's limits.

:class:`HeadReader` reads one connection's request heads, one at a time, each the bytes up to
and including its first empty line (``CRLF CRLF``). It gives a :class:`Head` only for a head
that llhttp, in its strict mode (the parser family under aiohttp's own C reader), reads as one
whole ``HTTP/1.1`` request without a body, and that aiohttp's reader would take as it is:

* exactly one message begins and ends in the bytes given, so there is no body: no
  ``Transfer-Encoding``, ``Content-Length`` absent or 0 (otherwise llhttp waits for more);
* at most :data:`MAX_HEAD` bytes, so the request line and each field are within aiohttp's
  ``max_line_size`` and ``max_field_size`` (8190), and at most :data:`MAX_FIELDS` fields
  (aiohttp's ``max_headers``);
* exactly one ``Host`` field, and no field named twice (aiohttp refuses repeats of ``Host``,
  ``Content-Length``, ``Transfer-Encoding`` and a few more; no answer here needs a repeat);
* no NUL in a value (llhttp refuses other control bytes itself).

Anything else gives ``None`` and the reader is spent: the caller hands every byte not answered
yet to aiohttp untouched, which answers it itself (400 for a malformed head, RFC 9112), so a
head is never read one way here and another way there.
"""

from __future__ import annotations

from dataclasses import dataclass

import httptools

#: The longest head read here (aiohttp's line and field limits, 8190, cannot be passed in it).
MAX_HEAD = 8192
#: The most fields a head read here may have (aiohttp's ``max_headers``).
MAX_FIELDS = 128
#: The end of a head.
END = b"\r\n\r\n"


@dataclass(frozen=True, slots=True)
class Head:
    """A request head: method, target as sent, and fields by lower-case name (values without
    the whitespace around them)."""

    method: bytes
    target: bytes
    fields: dict[bytes, bytes]


class HeadReader:
    """One connection's llhttp parser, fed one whole head at a time (module docstring)."""

    __slots__ = ("_begun", "_done", "_fields", "_good", "_parser", "_target")

    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._fields: dict[bytes, bytes] = {}
        self._target = b""
        self._begun = 0
        self._done = 0
        self._good = True

    def read(self, data: bytes) -> Head | None:
        """The head ``data`` (ending with its first ``CRLF CRLF``) if it qualifies, else
        ``None`` (then this reader must not be used again)."""
        self._fields = {}
        self._target = b""
        self._begun = self._done = 0
        if len(data) > MAX_HEAD:
            self._good = False
        if not self._good:
            return None
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._good = False
            return None
        fields = self._fields
        if (
            not self._good
            or self._begun != 1
            or self._done != 1
            or len(fields) > MAX_FIELDS
            or b"host" not in fields
            or self._parser.get_http_version() != "1.1"
        ):
            self._good = False
            return None
        return Head(self._parser.get_method(), self._target, fields)

    # llhttp's callbacks

    def on_message_begin(self) -> None:
        self._begun += 1

    def on_url(self, url: bytes) -> None:
        self._target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.lower()
        if key in self._fields or b"\0" in value:
            self._good = False
        self._fields[key] = value.rstrip(b" \t")

    def on_message_complete(self) -> None:
        self._done += 1
