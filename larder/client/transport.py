"""A small HTTP/1.1 client for the shim: one keep-alive connection, bodies by length or chunks.

The standard library's ``http.client`` costs about 50 ms to import (it pulls in the email
package), which the shim would pay on every rustc invocation; this module needs only ``socket``
(and ``ssl`` for https, imported when used). It speaks what larder's server sends: a status line,
headers, and a body delimited by ``Content-Length``, ``Transfer-Encoding: chunked`` or the end of
the connection (none at all after a ``204``, a ``304`` or a ``HEAD``, whatever the headers say);
interim answers (``100 Continue``, ``103 Early Hints``) before the final one are skipped. Any
socket or framing failure raises ``OSError`` (``TimeoutError`` for timeouts: a ``recv`` waiting
``timeout``, or an answer slower than :data:`MIN_RATE` on average) and closes the connection.

Through an http proxy (:mod:`larder.client.proxy`), an https server is reached in a ``CONNECT``
tunnel (TLS is then spoken with the server, end to end) and an http server with absolute-form
request targets (``GET http://host:port/path``) sent to the proxy.
"""

from __future__ import annotations

import io
import socket
import time
from typing import Any, BinaryIO

from larder.client.proxy import Proxy

_MAX_LINE = 65536
_MAX_HEADERS = 100
_SEND_CHUNK = 256 * 1024
_READ_BUFFER = 64 * 1024
_NO_BODY = frozenset({204, 304})
#: Interim (1xx) answers skipped before the final one (``100 Continue``, ``103 Early Hints``).
_MAX_INTERIM = 8


def _wire(host: str) -> str | bytes:
    """``host`` as ``getaddrinfo`` and ``ssl`` should get it: bytes when it is ASCII. Given a
    str they encode it with the ``idna`` codec, which leaves an ASCII host name unchanged but
    whose first use imports ``encodings.idna``, ``stringprep`` and ``unicodedata`` (a few ms
    per invocation); a name that is not ASCII still goes through that codec."""
    return host.encode("ascii") if host.isascii() else host


#: The slowest a response may come, on average, once ``timeout`` seconds have passed: a server
#: (or proxy) sending a byte now and then, each within the timeout, is given up on instead of
#: holding the build (a compilation is cheaper than a download slower than this).
MIN_RATE = 128 * 1024


class _Paced(io.RawIOBase):
    """A socket's received bytes, read with an overall deadline: a read fails with
    ``TimeoutError`` once the response that started at :meth:`restart` has taken longer than
    ``timeout`` seconds plus its bytes so far at :data:`MIN_RATE`. Each ``recv`` also waits at
    most ``timeout``."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        super().__init__()
        self._sock = sock
        self._timeout = timeout
        self.restart()

    def restart(self) -> None:
        self._since = time.monotonic()
        self._received = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        allowed = self._since + self._timeout + self._received / MIN_RATE - time.monotonic()
        if allowed <= 0:
            raise TimeoutError(f"the answer came slower than {MIN_RATE // 1024} KiB/s")
        self._sock.settimeout(min(self._timeout, allowed))
        count = self._sock.recv_into(buffer)
        self._received += count
        return count


class ProtocolError(OSError):
    """The server's answer is not HTTP/1.x as this client reads it."""


class ProxyRefused(ConnectionRefusedError):
    """The proxy would not open a tunnel to the server."""


class Response:
    """A response whose body is read incrementally with :meth:`read`."""

    def __init__(
        self,
        conn: Connection,
        status: int,
        headers: dict[str, str],
        http10: bool = False,
        method: str = "GET",
    ) -> None:
        self.status = status
        self.headers = headers
        self._conn = conn
        self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        if length is not None and not (length.isascii() and length.isdigit()):
            conn.close()
            raise ProtocolError(f"bad Content-Length {length[:40]!r}")
        self._remaining: int | None = (
            int(length) if length is not None and not self._chunked else None
        )
        if status in _NO_BODY or 100 <= status < 200 or method == "HEAD":
            self._chunked, self._remaining = False, 0  # never a body (RFC 9112, 6.3)
        self._chunk_left = 0
        self._done = self._remaining == 0
        connection = headers.get("connection", "").lower()
        self._close = (
            connection == "close"
            or (http10 and connection != "keep-alive")
            or (self._remaining is None and not self._chunked)
        )
        if self._done:
            self._finish()

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes of the body (everything left with ``-1``); ``b""`` at the end."""
        if self._done:
            return b""
        if size < 0:
            return b"".join(iter(lambda: self.read(_SEND_CHUNK), b""))
        if self._chunked:
            data = self._read_chunked(size)
        elif self._remaining is not None:
            data = self._conn.reader.read(min(size, self._remaining))
            if not data:
                raise ProtocolError("connection closed inside a response body")
            self._remaining -= len(data)
            self._done = self._remaining == 0
        else:
            data = self._conn.reader.read(size)
            self._done = not data
        if self._done:
            self._finish()
        return data

    def _read_chunked(self, size: int) -> bytes:
        reader = self._conn.reader
        if self._chunk_left == 0:
            line = reader.readline(_MAX_LINE)
            try:
                self._chunk_left = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size line {line[:40]!r}") from None
            if self._chunk_left == 0:
                while reader.readline(_MAX_LINE) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                self._done = True
                return b""
        data = reader.read(min(size, self._chunk_left))
        if not data:
            raise ProtocolError("connection closed inside a chunk")
        self._chunk_left -= len(data)
        if self._chunk_left == 0:
            reader.readline(_MAX_LINE)  # the CRLF after a chunk
        return data

    def _finish(self) -> None:
        if self._close:
            self._conn.close()


class Connection:
    """One persistent connection to ``host:port``, reopened on demand."""

    def __init__(
        self, host: str, port: int | None, tls: bool, timeout: float, proxy: Proxy | None = None
    ) -> None:
        self.host = host
        self.port = port or (443 if tls else 80)
        self.tls = tls
        self.timeout = timeout
        self.proxy = proxy
        self._sock: socket.socket | None = None
        self._paced: _Paced = None  # type: ignore[assignment]
        self.reader: BinaryIO = None  # type: ignore[assignment]

    @property
    def authority(self) -> str:
        """``host:port`` as a request's ``Host`` names it (an IPv6 address in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def close(self) -> None:
        if self._sock is not None:
            self.reader.close()  # the file object holds the socket open until closed
            self._sock.close()
            self._sock = None

    def _open(self) -> socket.socket:
        host, port = (self.proxy.host, self.proxy.port) if self.proxy else (self.host, self.port)
        peer = (_wire(host), port)  # create_connection hands the host to getaddrinfo: bytes do
        sock = socket.create_connection(peer, timeout=self.timeout)  # type: ignore[arg-type]
        try:
            if self.proxy is not None and self.tls:
                self._tunnel(sock, self.proxy)
            if self.tls:
                import ssl

                context = ssl.create_default_context()
                sock = context.wrap_socket(sock, server_hostname=_wire(self.host))
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._paced = _Paced(sock, self.timeout)
        self.reader = io.BufferedReader(self._paced, _READ_BUFFER)
        return sock

    def _tunnel(self, sock: socket.socket, proxy: Proxy) -> None:
        """Ask the proxy for a tunnel to the server; return once it answered 2xx."""
        target = self.authority
        lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
        if proxy.authorization:
            lines.append(f"Proxy-Authorization: {proxy.authorization}")
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        head = b""
        while b"\r\n\r\n" not in head:  # nothing follows the head until TLS starts
            data = sock.recv(4096)
            if not data:
                raise ProxyRefused("the proxy closed the connection")
            head += data
            if len(head) > _MAX_LINE:
                raise ProtocolError("the proxy's answer to CONNECT is too long")
        parts = head.split(b"\r\n", 1)[0].split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError(f"not an HTTP status line from the proxy: {head[:60]!r}")
        if not 200 <= int(parts[1]) < 300:
            raise ProxyRefused(f"the proxy refused a tunnel to {target}: HTTP {int(parts[1])}")

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes | BinaryIO | None = None,
        length: int = 0,
    ) -> Response:
        """Send a request and read the status line and headers of the answer.

        A kept-alive connection the server has meanwhile closed is reopened once.
        """
        reused = self._sock is not None
        try:
            return self._send(method, path, headers, body, length)
        except (ConnectionResetError, BrokenPipeError):
            rewindable = body is None or isinstance(body, bytes) or body.seekable()
            if not reused or not rewindable:
                raise
            if body is not None and not isinstance(body, bytes):
                body.seek(0)
            return self._send(method, path, headers, body, length)

    def _send(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes | BinaryIO | None,
        length: int,
    ) -> Response:
        if self._sock is None:
            self._sock = self._open()
        sock = self._sock
        authority = self.authority
        if self.proxy is not None and not self.tls:
            lines = [f"{method} http://{authority}{path} HTTP/1.1", f"Host: {authority}"]
            if self.proxy.authorization:
                lines.append(f"Proxy-Authorization: {self.proxy.authorization}")
        else:
            lines = [f"{method} {path} HTTP/1.1", f"Host: {authority}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body is not None:
            lines.append(f"Content-Length: {len(body) if isinstance(body, bytes) else length}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        try:
            if isinstance(body, bytes):
                sock.sendall(head + body)
            else:
                sock.sendall(head)
                while body is not None and (piece := body.read(_SEND_CHUNK)):
                    sock.sendall(piece)
            return self._response(method)
        except BaseException:
            self.close()
            raise

    def _response(self, method: str) -> Response:
        self._paced.restart()
        for _ in range(_MAX_INTERIM):
            status, headers, http10 = self._head()
            if not 100 <= status < 200:
                return Response(self, status, headers, http10=http10, method=method)
            if status == 101:  # never asked for: the connection no longer speaks HTTP/1.1
                raise ProtocolError("the server switched protocols unasked (101)")
            # 100 Continue, 103 Early Hints, ...: interim answers before the final one
        raise ProtocolError(f"more than {_MAX_INTERIM} interim (1xx) answers")

    def _head(self) -> tuple[int, dict[str, str], bool]:
        """One status line and its header fields: (status, fields by lower-case name, HTTP/1.0)."""
        status_line = self.reader.readline(_MAX_LINE)
        if not status_line:
            raise ConnectionResetError("the server closed the connection")
        parts = status_line.split(None, 2)
        if (
            len(parts) < 2
            or not parts[0].startswith(b"HTTP/1.")
            or len(parts[1]) != 3
            or not parts[1].isdigit()
        ):
            raise ProtocolError(f"not an HTTP status line: {status_line[:60]!r}")
        headers: dict[str, str] = {}
        for _ in range(_MAX_HEADERS):
            line = self.reader.readline(_MAX_LINE)
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        else:
            raise ProtocolError("too many response headers")
        http10 = parts[0] == b"HTTP/1.0"
        return int(parts[1]), headers, http10
