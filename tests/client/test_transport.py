"""The shim's small HTTP/1.1 client against hand-written server answers."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from larder.client.transport import Connection, ProtocolError


class Script:
    """A loopback server that answers each connection's requests from a list of raw replies."""

    def __init__(self, replies: list[list[bytes]]) -> None:
        self.replies = replies  # per connection, per request
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        for answers in self.replies:
            conn, _ = self.listener.accept()
            self.connections += 1
            with conn:
                for answer in answers:
                    request = b""
                    while b"\r\n\r\n" not in request:
                        data = conn.recv(65536)
                        if not data:
                            return
                        request += data
                    try:
                        conn.sendall(answer)
                    except OSError:  # the client stopped reading and closed: next connection
                        break

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def script(request: pytest.FixtureRequest) -> Iterator[Script]:
    server = Script(request.param)
    yield server
    server.close()


Connect = Callable[[Script], Connection]


@pytest.fixture
def connect() -> Iterator[Connect]:
    opened: list[Connection] = []

    def make(script: Script) -> Connection:
        opened.append(Connection("127.0.0.1", script.port, tls=False, timeout=2))
        return opened[-1]

    yield make
    for conn in opened:
        conn.close()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n"
)


@pytest.mark.parametrize("script", [[[OK, CHUNKED, OK]]], indirect=True)
def test_keep_alive_with_length_and_chunks(
    script: Script, connect: Callable[[Script], Connection]
) -> None:
    conn = connect(script)
    assert conn.request("GET", "/a", {}).read() == b"hello"
    response = conn.request("PUT", "/b", {}, b"body")
    assert response.status == 200 and response.read() == b"abcde"
    assert conn.request("GET", "/c", {}).read(2) == b"he"
    assert script.connections == 1


NO_CONTENT = b"HTTP/1.1 204 No Content\r\n\r\n"


@pytest.mark.parametrize("script", [[[NO_CONTENT, OK]]], indirect=True)
def test_a_204_has_no_body_and_keeps_the_connection(
    script: Script, connect: Callable[[Script], Connection]
) -> None:
    conn = connect(script)  # reading to the end of the connection would time out
    response = conn.request("POST", "/explained", {}, b"{}")
    assert response.status == 204 and response.read() == b""
    assert conn.request("GET", "/a", {}).read() == b"hello"
    assert script.connections == 1


HTTP10 = b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n"


@pytest.mark.parametrize("script", [[[HTTP10], [OK]]], indirect=True)
def test_http10_answers_close_the_connection(
    script: Script, connect: Callable[[Script], Connection]
) -> None:
    conn = connect(script)
    assert conn.request("GET", "/a", {}).status == 404
    assert conn.request("GET", "/b", {}).read() == b"hello"
    assert script.connections == 2


@pytest.mark.parametrize("script", [[[OK], [OK]]], indirect=True)
def test_a_closed_kept_alive_connection_is_reopened_once(
    script: Script, connect: Callable[[Script], Connection]
) -> None:
    conn = connect(script)
    assert conn.request("GET", "/a", {}).read() == b"hello"
    # The server closed the first connection after one answer; the client retries once.
    assert conn.request("GET", "/b", {}).read() == b"hello"
    assert script.connections == 2


@pytest.mark.parametrize(
    "script",
    [[[b"SMTP ready\r\n\r\n"]], [[b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"]]],
    indirect=True,
)
def test_garbage_and_truncation_are_errors(
    script: Script, connect: Callable[[Script], Connection]
) -> None:
    conn = connect(script)
    with pytest.raises(OSError):
        conn.request("GET", "/", {}).read()


EARLY = b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@pytest.mark.parametrize("script", [[[EARLY + CONTINUE + OK, OK]]], indirect=True)
def test_interim_answers_are_skipped_for_the_final_one(
    script: Script, connect: Callable[[Script], Connection]
) -> None:
    conn = connect(script)
    response = conn.request("GET", "/a", {})
    assert response.status == 200 and response.read() == b"hello"
    assert conn.request("GET", "/b", {}).read() == b"hello"  # nothing was left unread
    assert script.connections == 1


@pytest.mark.parametrize(
    "script",
    [
        [[b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n"]],
        [[EARLY * 9 + OK]],
        [[b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nhello"]],
        [[b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nhello"]],
        [[b"HTTP/1.1 2000 OK\r\nContent-Length: 5\r\n\r\nhello"]],
    ],
    indirect=True,
    ids=["101-unasked", "endless-1xx", "length-not-a-number", "negative-length", "4-digit-status"],
)
def test_answers_that_are_not_http_are_protocol_errors(
    script: Script, connect: Callable[[Script], Connection]
) -> None:
    conn = connect(script)
    with pytest.raises(ProtocolError):
        conn.request("GET", "/", {}).read()


def test_an_ipv6_server_is_named_in_brackets() -> None:
    try:
        listener = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        pytest.fail("this machine has no IPv6 loopback")
    port = listener.getsockname()[1]
    heads: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(65536)
            heads.append(head)
            conn.sendall(OK)

    threading.Thread(target=serve, daemon=True).start()
    conn = Connection("::1", port, tls=False, timeout=2)
    try:
        assert conn.request("GET", "/a", {}).read() == b"hello"
    finally:
        conn.close()
        listener.close()
    assert f"\r\nHost: [::1]:{port}\r\n".encode() in heads[0]


def test_protocol_error_is_an_os_error() -> None:
    assert issubclass(ProtocolError, OSError)


@pytest.mark.parametrize("stage", ["head", "body"])
def test_an_answer_that_trickles_in_is_given_up_on(stage: str) -> None:
    """A byte every 0.2 s never trips a per-read timeout of 1 s; the whole answer's deadline
    (timeout plus its bytes at MIN_RATE) does, so a stalled cache cannot hold a build."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
            if stage == "body":
                conn.sendall(head)
            for byte in head if stage == "head" else b"x" * 100000:
                if stop.wait(0.2):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    threading.Thread(target=trickle, daemon=True).start()
    connection = Connection("127.0.0.1", listener.getsockname()[1], tls=False, timeout=1)
    start = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            connection.request("GET", "/blob", {}).read()
    finally:
        stop.set()
        connection.close()
        listener.close()
    assert time.monotonic() - start < 3


def test_a_steady_answer_slower_than_one_read_timeout_arrives_whole() -> None:
    """The deadline grows with the bytes received: a large body at a fair rate is read."""
    body = bytes(range(256)) * 4096  # 1 MiB
    listener = socket.create_server(("127.0.0.1", 0))

    def steady() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
            for offset in range(0, len(body), 256 * 1024):
                time.sleep(0.4)  # 640 KiB/s, each pause under the 1 s timeout, 1.6 s in all
                conn.sendall(body[offset : offset + 256 * 1024])

    threading.Thread(target=steady, daemon=True).start()
    connection = Connection("127.0.0.1", listener.getsockname()[1], tls=False, timeout=1)
    try:
        assert connection.request("GET", "/blob", {}).read() == body
    finally:
        connection.close()
        listener.close()
