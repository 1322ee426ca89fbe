"""The shim honours https_proxy/http_proxy and no_proxy: urllib's rules, a CONNECT tunnel for
an https cache, absolute-form requests for an http one (a loopback proxy records what it saw)."""

from __future__ import annotations

import socket
import ssl
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest

from larder.client.proxy import bypassed, proxies_from, proxy_for
from larder.client.remote import Remote, RemoteError
from tests.certificates import self_signed

ENVIRONMENTS = [
    {},
    {"http_proxy": "http://p:1"},
    {"HTTP_PROXY": "http://P:1", "http_proxy": "http://p:2"},
    {"HTTPS_PROXY": "http://p:3", "https_proxy": ""},
    {"HTTP_PROXY": "http://p:4", "REQUEST_METHOD": "GET"},
    {"http_proxy": "http://p:5", "REQUEST_METHOD": "GET"},
    {"https_proxy": "p:6", "NO_PROXY": "example.com"},
    {"no_proxy": "*", "https_proxy": "http://p:7"},
]


@pytest.mark.parametrize("environ", ENVIRONMENTS)
def test_proxy_variables_read_as_urllib_reads_them(environ: dict[str, str]) -> None:
    with mock.patch.dict("os.environ", environ, clear=True):
        assert proxies_from(environ) == urllib.request.getproxies_environment()


@pytest.mark.parametrize(
    "host", ["larder", "larder:8080", "a.example.com", "example.com:443", "notexample.com", "x:"]
)
@pytest.mark.parametrize(
    "no_proxy", ["example.com", ".example.com, larder", "LARDER:8080", "*", "", " , other"]
)
def test_no_proxy_matches_as_urllib_matches(host: str, no_proxy: str) -> None:
    expected = urllib.request.proxy_bypass_environment(host, {"no": no_proxy})
    assert bypassed(host, no_proxy) == expected


def test_proxy_for_picks_by_scheme_and_reads_credentials() -> None:
    environ = {"https_proxy": "http://us%40er:pa%3Ass@proxy:3128", "http_proxy": "proxy2"}
    found = proxy_for("https", "larder:8443", environ)
    assert found is not None and (found.host, found.port) == ("proxy", 3128)
    assert found.authorization == "Basic dXNAZXI6cGE6c3M="  # base64 of "us@er:pa:ss"
    assert proxy_for("http", "larder", environ) == ("proxy2", 80, None)
    assert proxy_for("http", "larder", {**environ, "no_proxy": "larder"}) is None
    with pytest.raises(ValueError, match="https_proxy"):
        proxy_for("https", "larder", {"https_proxy": "socks5://proxy:1080"})


class RecordingProxy:
    """A loopback http proxy: relays CONNECT tunnels, answers plain requests itself with 404,
    and records each request head it received."""

    def __init__(self, refuse: bool = False) -> None:
        self.heads: list[bytes] = []
        self.refuse = refuse
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            self.heads.append(head)
            method, target = head.split(b" ", 2)[:2]
            if method != b"CONNECT":
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                return
            if self.refuse:
                conn.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
                return
            host, _, port = target.decode().rpartition(":")
            with socket.create_connection((host, int(port))) as upstream:
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                threading.Thread(target=_pipe, args=(upstream, conn), daemon=True).start()
                _pipe(conn, upstream)

    def close(self) -> None:
        self.listener.close()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass


@pytest.fixture
def proxy() -> Iterator[RecordingProxy]:
    server = RecordingProxy()
    yield server
    server.close()


def _tls_server(cert_file: Path, key_file: Path, seen: list[bytes]) -> socket.socket:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        try:
            raw, _ = listener.accept()
        except OSError:
            return
        with context.wrap_socket(raw, server_side=True) as conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(65536)
            seen.append(head)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nmanifest")

    threading.Thread(target=serve, daemon=True).start()
    return listener


def test_https_cache_through_a_connect_tunnel(proxy: RecordingProxy, tmp_path: Path) -> None:
    cert_file, key_file = self_signed(tmp_path, "localhost")
    seen: list[bytes] = []
    server = _tls_server(cert_file, key_file, seen)
    port = server.getsockname()[1]
    trusting = ssl.create_default_context(cafile=str(cert_file))
    environ = {"HTTPS_PROXY": f"http://user:secret@127.0.0.1:{proxy.port}", "NO_PROXY": "other"}
    with mock.patch("ssl.create_default_context", return_value=trusting):
        remote = Remote(f"https://localhost:{port}/main", None, 5, environ)
        try:
            assert remote.get_manifest("k") == b"manifest"
        finally:
            remote.close()
            server.close()
    assert proxy.heads[0].startswith(f"CONNECT localhost:{port} HTTP/1.1\r\n".encode())
    assert b"Proxy-Authorization: Basic dXNlcjpzZWNyZXQ=\r\n" in proxy.heads[0]
    # What the proxy relayed was TLS: the server, not the proxy, read the request.
    assert seen[0].startswith(b"GET /main/rustc/manifests/k HTTP/1.1\r\n")
    assert b"Proxy-Authorization" not in seen[0]


def test_http_cache_through_a_proxy_uses_absolute_form(proxy: RecordingProxy) -> None:
    environ = {"http_proxy": f"127.0.0.1:{proxy.port}"}
    remote = Remote("http://larder.internal:8080/main", None, 5, environ)
    try:
        assert remote.get_manifest("k") is None  # the proxy's 404
    finally:
        remote.close()
    assert proxy.heads[0].startswith(
        b"GET http://larder.internal:8080/main/rustc/manifests/k HTTP/1.1\r\n"
        b"Host: larder.internal:8080\r\n"
    )


def test_no_proxy_and_a_refusing_proxy() -> None:
    refusing = RecordingProxy(refuse=True)
    try:
        environ = {"https_proxy": f"http://127.0.0.1:{refusing.port}", "no_proxy": "*"}
        direct = Remote("https://127.0.0.1:9/main", None, 2, environ)
        with pytest.raises(RemoteError) as failed:
            direct.get_manifest("k")  # port 9 refuses: tried directly, not through the proxy
        assert failed.value.kind == "connect" and refusing.heads == []
        tunnelled = Remote("https://127.0.0.1:9/main", None, 2, {**environ, "no_proxy": ""})
        with pytest.raises(RemoteError, match="refused a tunnel") as failed:
            tunnelled.get_manifest("k")
        assert failed.value.kind == "connect"
        assert refusing.heads[0].startswith(b"CONNECT 127.0.0.1:9 HTTP/1.1\r\n")
    finally:
        refusing.close()
