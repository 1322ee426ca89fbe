"""The shim's HTTP client for ``<LARDER_URL>/rustc/`` (see :mod:`larder.service.routes.rustc`).

One keep-alive connection per invocation (:mod:`larder.client.transport`), through the proxy
``https_proxy``/``http_proxy`` name unless ``no_proxy`` exempts the host
(:mod:`larder.client.proxy`), a short timeout on
every socket operation, and a single exception type: any failure (refused, timed out, 5xx, an
unexpected status or body, a blob that does not hash to its name) is a :class:`RemoteError` with
a short ``kind`` for the stats. A 404 is a miss, not an error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import quote, urlsplit

import blake3

from larder.client.proxy import Proxy, proxy_for
from larder.client.transport import Connection, ProtocolError, Response
from larder.errors import FormatError
from larder.protocol.rustc import DirectEntry, parse_direct_entries

if TYPE_CHECKING:
    from larder.protocol.inputs import Identity, Nearest

_CHUNK = 256 * 1024
#: A blob up to this size is compressed in memory; a larger one into a file beside it first
#: (its length must be known before it is sent).
IN_MEMORY_STREAM = 32 * 1024 * 1024
DEFAULT_TIMEOUT = 5.0


def _small(path: Path) -> bool:
    try:
        return path.stat().st_size <= IN_MEMORY_STREAM
    except OSError:
        return False  # the file path below says what is wrong


def network_timeout(environ: dict[str, str]) -> float:
    """Seconds per network operation: ``LARDER_TIMEOUT``, or 5 when unset or not a number."""
    try:
        return float(environ.get("LARDER_TIMEOUT") or DEFAULT_TIMEOUT)
    except ValueError:
        return DEFAULT_TIMEOUT


class RemoteError(Exception):
    """The cache could not be used for this request; ``kind`` names why."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind

    @property
    def unreachable(self) -> bool:
        """Whether the server could not be reached at all (worth backing off)."""
        return self.kind in ("connect", "timeout")


class Remote:
    """The rustc artifact API of one cache."""

    def __init__(
        self,
        url: str,
        token: str | None,
        timeout: float,
        environ: dict[str, str] | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RemoteError("config", f"LARDER_URL must be http(s)://HOST[:PORT]/CACHE: {url!r}")
        try:
            self._proxy: Proxy | None = proxy_for(
                parts.scheme,
                parts.netloc.rpartition("@")[2],
                dict(os.environ if environ is None else environ),
            )
        except ValueError as exc:
            raise RemoteError("config", str(exc)) from None
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port
        self._base = parts.path.rstrip("/") + "/rustc"
        self._token = token
        self._timeout = timeout
        self._conn: Connection | None = None
        self.bytes_down = 0
        self.bytes_up = 0
        self._codings = True  # until a server refuses a Content-Encoding (415)
        self.miss_counted = False  # the server counted the last direct lookup's 404 as a miss

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> Connection:
        if self._conn is None:
            tls = self._scheme == "https"
            self._conn = Connection(self._host, self._port, tls, self._timeout, self._proxy)
        return self._conn

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | BinaryIO | None = None,
        length: int | None = None,
        content_type: str = "application/octet-stream",
        extra_headers: dict[str, str] | None = None,
    ) -> Response:
        headers = {"User-Agent": "larder-rustc", **(extra_headers or {})}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        if body is not None:
            headers["Content-Type"] = content_type
        try:
            response = self._connection().request(
                method, self._base + path, headers, body, length or 0
            )
        except TimeoutError as exc:
            self.close()
            raise RemoteError("timeout", str(exc) or "timed out") from None
        except ProtocolError as exc:
            self.close()
            raise RemoteError("corrupt", str(exc)) from None
        except OSError as exc:
            self.close()
            raise RemoteError("connect", str(exc) or type(exc).__name__) from None
        if response.status >= 500:
            response.read()
            raise RemoteError("server", f"{method} {path}: HTTP {response.status}")
        return response

    def _read(self, response: Response) -> bytes:
        try:
            data = response.read()
        except OSError as exc:
            self.close()
            raise RemoteError("timeout", f"reading the response: {exc}") from None
        self.bytes_down += len(data)
        return data

    def _expect(self, response: Response, what: str, *ok: int) -> bytes:
        data = self._read(response)
        if response.status not in ok:
            message = data[:200].decode("utf-8", "replace").strip()
            kind = "auth" if response.status in (401, 403) else "refused"
            raise RemoteError(kind, f"{what}: HTTP {response.status} {message}")
        return data

    # -- reads -----------------------------------------------------------------------------

    def get_manifest(self, key: str, crate: str | None = None) -> bytes | None:
        """The manifest stored under ``key``, or None on a miss (counted against ``crate``)."""
        headers = {"X-Larder-Crate": crate} if crate else None
        response = self._request("GET", f"/manifests/{key}", extra_headers=headers)
        if response.status == 404:
            self._read(response)
            return None
        return self._expect(response, "manifest", 200)

    def get_direct(self, direct_key: str, crate: str | None = None) -> list[DirectEntry]:
        """The direct entries recorded under ``direct_key`` (none on a 404). With ``crate``, a
        server that counts a 404 as that crate's miss says so: :attr:`miss_counted`."""
        headers = {"X-Larder-Crate": crate} if crate else None
        response = self._request("GET", f"/direct/{direct_key}", extra_headers=headers)
        if response.status == 404:
            self._read(response)
            self.miss_counted = response.headers.get("x-larder-counted") == "miss"
            return []
        try:
            return parse_direct_entries(self._expect(response, "direct entries", 200))
        except FormatError as exc:
            raise RemoteError("corrupt", str(exc)) from None

    def nearest(self, identity: Identity) -> list[Nearest] | None:
        """The keys most recently stored for ``identity``; None when the server keeps no
        inputs documents (a server older than them answers 404)."""
        from larder.protocol.inputs import parse_nearest  # misses only

        query = "&".join(f"{k}={quote(v, safe='')}" for k, v in identity.as_dict().items())
        response = self._request("GET", f"/inputs?{query}")
        if response.status in (404, 405):
            self._read(response)
            return None
        try:
            return parse_nearest(self._expect(response, "nearest keys", 200))
        except FormatError as exc:
            raise RemoteError("corrupt", str(exc)) from None

    def get_inputs(self, key: str) -> dict[str, Any] | None:
        """The ``inputs`` of the document stored for ``key``, or None."""
        from larder.protocol.inputs import parse_document  # misses only

        response = self._request("GET", f"/inputs/{key}")
        if response.status == 404:
            self._read(response)
            return None
        try:
            return parse_document(self._expect(response, "inputs document", 200)).inputs
        except FormatError as exc:
            raise RemoteError("corrupt", str(exc)) from None

    def report_explained(self, crate: str, category: str) -> None:
        """Tell the cache why ``crate`` missed (counted by category; any answer will do)."""
        from larder.protocol.inputs import report_to_json

        body = report_to_json(crate, category)
        response = self._request("POST", "/explained", body, content_type="application/json")
        self._read(response)

    def download_blob(self, blob_id: str, out: BinaryIO) -> int:
        """Write the blob's bytes to ``out``; check they hash to ``blob_id``; return the size."""
        response = self._request("GET", f"/blobs/{blob_id}")
        if response.status != 200:
            self._expect(response, f"blob {blob_id[:12]}", 200)

        import zstandard  # only on a hit: it takes a while to import

        hasher = blake3.blake3()
        size = 0
        decoder = zstandard.ZstdDecompressor()
        decompressor = decoder.decompressobj()
        try:
            while chunk := response.read(_CHUNK):
                self.bytes_down += len(chunk)
                while chunk:
                    data = decompressor.decompress(chunk)
                    hasher.update(data)
                    out.write(data)
                    size += len(data)
                    # A stream of several frames (an upload encoded elsewhere): the next one.
                    chunk = decompressor.unused_data if decompressor.eof else b""
                    if decompressor.eof:
                        decompressor = decoder.decompressobj()
        except OSError as exc:
            self.close()
            raise RemoteError("timeout", f"reading blob {blob_id[:12]}: {exc}") from None
        except zstandard.ZstdError as exc:
            self.close()
            raise RemoteError("corrupt", f"blob {blob_id[:12]}: {exc}") from None
        if hasher.hexdigest() != blob_id:
            raise RemoteError("corrupt", f"blob {blob_id[:12]} does not hash to its name")
        return size

    # -- writes ----------------------------------------------------------------------------

    def missing(self, blob_ids: list[str]) -> list[str]:
        """Which of ``blob_ids`` the cache still needs."""
        body = json.dumps({"blobs": blob_ids}).encode()
        response = self._request("POST", "/missing", body, content_type="application/json")
        data = self._expect(response, "missing-blob query", 200)
        try:
            missing = json.loads(data)["missing"]
        except (ValueError, KeyError, TypeError) as exc:
            raise RemoteError("corrupt", f"missing-blob answer: {exc}") from None
        if not isinstance(missing, list) or not set(missing) <= set(blob_ids):
            raise RemoteError("corrupt", "missing-blob answer names blobs not asked about")
        return [str(blob) for blob in missing]

    def put_blob(self, blob_id: str, content: bytes | Path, level: int | None = None) -> None:
        """Upload one output file (streamed from disk when given a path).

        With a zstd ``level``, the body is a zstd stream of the file (``Content-Encoding: zstd``,
        made in memory, or beside the file first past :data:`IN_MEMORY_STREAM`, so its length
        is known): the server decodes it to check the id and keeps it as sent. A server that
        takes no coding (415) gets the bytes as they are, and every later blob of this
        connection too; so does a blob whose stream finds no room on disk.
        """
        if level is not None and self._codings:
            sent = self._put_zstd(blob_id, content, level)
            if sent == 200:
                return
            self._codings = sent != 415  # else no room for the stream: this blob as it is
        if isinstance(content, bytes):
            response = self._request("PUT", f"/blobs/{blob_id}", content)
            size = len(content)
        else:
            size = os.path.getsize(content)
            with open(content, "rb") as body:
                response = self._request("PUT", f"/blobs/{blob_id}", body, length=size)
        self._expect(response, f"blob upload {blob_id[:12]}", 200, 201, 204)
        self.bytes_up += size

    def _put_zstd(self, blob_id: str, content: bytes | Path, level: int) -> int:
        """Send ``content`` as a zstd stream: 200 when sent, 415 when the server takes no
        coding, 0 when the stream could not be made (no room beside the file)."""
        import zstandard

        compressor = zstandard.ZstdCompressor(level=level, write_checksum=True)
        what = f"blob upload {blob_id[:12]}"
        coded = {"Content-Encoding": "zstd"}
        if isinstance(content, Path) and _small(content):
            path = content
            try:
                content = path.read_bytes()  # a stream this small needs no file beside it
            except OSError:
                if path.is_file():
                    return 0
                raise  # the snapshot itself is gone: no way to send it
        if isinstance(content, bytes):
            body = compressor.compress(content)
            response = self._request("PUT", f"/blobs/{blob_id}", body, extra_headers=coded)
            size = len(body)
        else:
            encoded = content.with_name(content.name + ".zst")
            try:
                try:
                    with open(content, "rb") as source, open(encoded, "wb") as sink:
                        compressor.copy_stream(source, sink)
                except OSError:
                    if not content.is_file():
                        raise  # the snapshot itself is gone: no way to send it
                    return 0
                size = os.path.getsize(encoded)
                with open(encoded, "rb") as stream:
                    response = self._request(
                        "PUT", f"/blobs/{blob_id}", stream, length=size, extra_headers=coded
                    )
            finally:
                encoded.unlink(missing_ok=True)
        if response.status == 415:
            self._read(response)
            return 415
        self._expect(response, what, 200, 201, 204)
        self.bytes_up += size
        return 200

    def put_direct(self, direct_key: str, entry: DirectEntry) -> None:
        document = entry.to_json()
        response = self._request(
            "PUT", f"/direct/{direct_key}", document, content_type="application/json"
        )
        self._expect(response, "direct entry upload", 200, 201, 204)
        self.bytes_up += len(document)

    def put_inputs(self, key: str, document: bytes) -> None:
        """Store the inputs document of ``key`` (after its manifest)."""
        response = self._request("PUT", f"/inputs/{key}", document, content_type="application/json")
        self._expect(response, "inputs document upload", 200, 201, 204)
        self.bytes_up += len(document)

    def put_manifest(self, key: str, document: bytes) -> None:
        response = self._request(
            "PUT", f"/manifests/{key}", document, content_type="application/json"
        )
        self._expect(response, "manifest upload", 200, 201, 204)
        self.bytes_up += len(document)
