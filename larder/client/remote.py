"""The shim's HTTP client for ``<LARDER_URL>/rustc/`` (see :mod:`larder.service.routes.rustc`).

One keep-alive connection per invocation (:mod:`larder.client.transport`), through the proxy
``https_proxy``/``http_proxy`` name unless ``no_proxy`` exempts the host
(:mod:`larder.client.proxy`), a short timeout on
every socket operation, and a single exception type: any failure (refused, timed out, 5xx, an
unexpected status or body, a blob that does not hash to its name) is a :class:`RemoteError` with
a short ``kind`` for the stats. A 404 is a miss, not an error.

Nothing an answer says is trusted further than it is checked: an answer is read into memory only
up to the size its kind may have (:data:`MAX_ANSWER`, :data:`MAX_DIRECT_ANSWER`), a blob is
decoded only up to the size its manifest states and must hash to its name, and an upload counts
as stored only when the answer names what was sent (a proxy's ``200`` page does not).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast
from urllib.parse import quote, urlsplit

import blake3

from larder.client.proxy import Proxy, proxy_for
from larder.client.transport import Connection, ProtocolError, Response
from larder.errors import FormatError
from larder.protocol.rustc import (
    MAX_DIRECT_ENTRIES,
    MAX_MANIFEST_SIZE,
    DirectEntry,
    load_json,
    parse_direct_entries,
)

if TYPE_CHECKING:
    from larder.protocol.inputs import Identity, Nearest

_CHUNK = 256 * 1024
#: A blob up to this size is compressed in memory; a larger one into a file beside it first
#: (its length must be known before it is sent).
IN_MEMORY_STREAM = 32 * 1024 * 1024
DEFAULT_TIMEOUT = 5.0
#: The longest ``LARDER_TIMEOUT`` taken (an hour); more, or not a positive number, is the default.
MAX_TIMEOUT = 3600.0
#: The most of an answer read into memory: a manifest, an inputs document or an error page.
MAX_ANSWER = 2 * MAX_MANIFEST_SIZE
#: The most of a direct lookup's answer (its entries are each at most a manifest's size).
MAX_DIRECT_ANSWER = MAX_DIRECT_ENTRIES * MAX_MANIFEST_SIZE
#: What of an error answer is read before the connection is dropped instead.
MAX_ERROR_BODY = 64 * 1024


def _small(path: Path) -> bool:
    try:
        return path.stat().st_size <= IN_MEMORY_STREAM
    except OSError:
        return False  # the file path below says what is wrong


def network_timeout(environ: dict[str, str]) -> float:
    """Seconds per network operation: ``LARDER_TIMEOUT``, or 5 when unset or not a number of
    seconds above 0 and at most :data:`MAX_TIMEOUT` (``inf``, ``nan``, ``0``, ``-1``)."""
    try:
        seconds = float(environ.get("LARDER_TIMEOUT") or DEFAULT_TIMEOUT)
    except ValueError:
        return DEFAULT_TIMEOUT
    return seconds if 0 < seconds <= MAX_TIMEOUT else DEFAULT_TIMEOUT


#: What a refusal is counted as, by status (``refused`` otherwise). A 413 is larder's
#: ``max_upload_size`` or, in front of it, a proxy's body size limit (nginx's 1 MiB default).
_REFUSAL_KINDS = {401: "auth", 403: "auth", 413: "too-large"}
#: Credentials an error page may echo back: kept out of what ``--stats`` shows.
_CREDENTIALS = re.compile(r"((?:Bearer|Basic)\s+)\S+", re.IGNORECASE)


def url_cache(url: str) -> str:
    """The path of the cache a ``LARDER_URL`` names, without empty segments (``//main`` is
    ``main``); behind a reverse proxy it may begin with the proxy's prefix (``larder/main``)."""
    return "/".join(segment for segment in urlsplit(url).path.split("/") if segment)


def url_cache_name(url: str) -> str:
    """The name of the cache a ``LARDER_URL`` names: the last segment of its path (a cache
    name has no ``/``; ``https://host/larder/main`` names ``main``)."""
    return url_cache(url).rpartition("/")[2]


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
        try:
            port = parts.port
        except ValueError:  # not a number, or past 65535
            port = -1
        cache = url_cache(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or port == -1 or not cache:
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
        self._port = port
        self._base = f"/{cache}/rustc"  # empty segments dropped (``//main``)
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
            self._read(response, MAX_ERROR_BODY, drop=True)
            raise RemoteError("server", f"{method} {path}: HTTP {response.status}")
        return response

    def _read(self, response: Response, limit: int = MAX_ANSWER, drop: bool = False) -> bytes:
        """The answer's body, at most ``limit`` bytes: past it the connection is closed and the
        answer is ``corrupt`` (or, with ``drop``, the first ``limit`` bytes are returned). A
        body cut short is ``corrupt`` too: the server was reached, so no reason to back off."""
        parts: list[bytes] = []
        size = 0
        try:
            while piece := response.read(min(_CHUNK, limit + 1 - size)):
                self.bytes_down += len(piece)
                size += len(piece)
                if size > limit:
                    self.close()
                    if drop:
                        break
                    raise RemoteError("corrupt", f"an answer larger than {limit} bytes")
                parts.append(piece)
        except TimeoutError as exc:
            self.close()
            raise RemoteError("timeout", f"reading the response: {exc}") from None
        except OSError as exc:
            self.close()
            raise RemoteError("corrupt", f"reading the response: {exc}") from None
        return b"".join(parts)

    def _expect(self, response: Response, what: str, *ok: int, limit: int = MAX_ANSWER) -> bytes:
        if response.status not in ok:
            data = self._read(response, MAX_ERROR_BODY, drop=True)
            message = _CREDENTIALS.sub(r"\1<hidden>", data[:200].decode("utf-8", "replace"))
            kind = _REFUSAL_KINDS.get(response.status, "refused")
            where = response.headers.get("location")
            moved = f" (to {where[:200]!r}: not followed)" if where is not None else ""
            raise RemoteError(kind, f"{what}: HTTP {response.status}{moved} {message.strip()!r}")
        return self._read(response, limit)

    def _stored(self, response: Response, what: str, field: str, value: str) -> None:
        """An upload's answer: 2xx naming ``value`` as its ``field`` (larder echoes what it
        stored), else the upload did not reach the cache."""
        data = self._expect(response, what, 200, 201)
        try:
            echoed = load_json(data, what).get(field)
        except (FormatError, AttributeError):
            echoed = None
        if echoed != value:
            raise RemoteError("corrupt", f"{what}: the answer does not name what was sent")

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
        data = self._expect(response, "direct entries", 200, limit=MAX_DIRECT_ANSWER)
        try:
            return parse_direct_entries(data)
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

    def download_blob(self, blob_id: str, out: BinaryIO, size: int) -> None:
        """Write the blob's bytes to ``out``: exactly ``size`` of them (what its manifest
        states; a stream that decodes to more is cut off there), hashing to ``blob_id``."""
        response = self._request("GET", f"/blobs/{blob_id}")
        if response.status == 404:  # the cache lost it (an older collector): upload it again
            self._read(response, MAX_ERROR_BODY, drop=True)
            raise RemoteError("gone", f"blob {blob_id[:12]}: HTTP 404")
        if response.status != 200:
            self._expect(response, f"blob {blob_id[:12]}", 200)

        import zstandard  # only on a hit: it takes a while to import

        hasher = blake3.blake3()
        written = 0
        source = _Counted(response, self)
        # Several frames may follow each other (an upload encoded elsewhere); each read
        # decodes at most _CHUNK bytes, so a small stream that decodes to gigabytes costs no
        # more than the first byte past ``size``.
        reader = zstandard.ZstdDecompressor().stream_reader(
            cast(BinaryIO, source), read_size=_CHUNK, read_across_frames=True, closefd=False
        )
        try:
            while data := reader.read(min(_CHUNK, size + 1 - written)):
                written += len(data)
                if written > size:
                    self.close()
                    raise RemoteError("corrupt", f"blob {blob_id[:12]} is larger than stated")
                hasher.update(data)
                out.write(data)
        except TimeoutError as exc:
            self.close()
            raise RemoteError("timeout", f"reading blob {blob_id[:12]}: {exc}") from None
        except (OSError, zstandard.ZstdError) as exc:
            self.close()
            raise RemoteError("corrupt", f"blob {blob_id[:12]}: {exc}") from None
        if written != size:
            raise RemoteError("corrupt", f"blob {blob_id[:12]} is smaller than stated")
        if hasher.hexdigest() != blob_id:
            raise RemoteError("corrupt", f"blob {blob_id[:12]} does not hash to its name")

    # -- writes ----------------------------------------------------------------------------

    def missing(self, blob_ids: list[str]) -> list[str]:
        """Which of ``blob_ids`` the cache still needs."""
        body = json.dumps({"blobs": blob_ids}).encode()
        response = self._request("POST", "/missing", body, content_type="application/json")
        data = self._expect(response, "missing-blob query", 200)
        try:
            missing = load_json(data, "missing-blob answer")["missing"]
        except (FormatError, KeyError, TypeError) as exc:
            raise RemoteError("corrupt", f"missing-blob answer: {exc}") from None
        if not isinstance(missing, list) or not all(isinstance(b, str) for b in missing):
            raise RemoteError("corrupt", "missing-blob answer is not a list of ids")
        if not set(missing) <= set(blob_ids):
            raise RemoteError("corrupt", "missing-blob answer names blobs not asked about")
        return [str(blob) for blob in missing]

    def put_blob(self, blob_id: str, content: bytes | Path, level: int | None = None) -> None:
        """Upload one output file (streamed from disk when given a path).

        With a zstd ``level``, the body is a zstd stream of the file (``Content-Encoding: zstd``,
        made in memory, or beside the file first past :data:`IN_MEMORY_STREAM`, so its length
        is known): the server decodes it to check the id and keeps it as sent. A server that
        takes no coding (415) gets the bytes as they are, and every later blob of this
        connection too; so does a blob whose stream finds no room on disk. A 400 about the
        Content-Encoding, or without a JSON error (an HTTP layer that fails to decode it:
        larder before coded uploads), is answered by sending the bytes as they are, and, if
        the server takes those, treated as a 415; larder's own 400 is the blob's refusal.
        """
        coded = 0  # what the coded upload got (see _put_zstd)
        if level is not None and self._codings:
            coded = self._put_zstd(blob_id, content, level)
            if coded == 200:
                return
            self._codings = coded != 415  # 0: no room for the stream (this blob only)
        if isinstance(content, bytes):
            response = self._request("PUT", f"/blobs/{blob_id}", content)
            size = len(content)
        else:
            size = os.path.getsize(content)
            with open(content, "rb") as body:
                response = self._request("PUT", f"/blobs/{blob_id}", body, length=size)
        self._stored(response, f"blob upload {blob_id[:12]}", "blake3", blob_id)
        self.bytes_up += size
        if coded == 400:  # the coding was what the server refused: no coding from now on
            self._codings = False

    def _put_zstd(self, blob_id: str, content: bytes | Path, level: int) -> int:
        """Send ``content`` as a zstd stream: 200 when sent, 415 when the server takes no
        coding, 400 when it failed to decode the coding, 0 when the stream could not be made
        (no room beside the file)."""
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
        if response.status == 400:
            data = self._read(response, MAX_ERROR_BODY, drop=True)
            # An HTTP layer that fails to decode the coding: it says so, or says nothing (larder
            # itself answers a refusal with a JSON error).
            if b"content-encoding" in data.lower() or not data.strip().startswith(b"{"):
                return 400
            message = data[:200].decode("utf-8", "replace").strip()
            raise RemoteError("refused", f"{what}: HTTP 400 {message!r}")
        self._stored(response, what, "blake3", blob_id)
        self.bytes_up += size
        return 200

    def put_direct(self, direct_key: str, entry: DirectEntry) -> None:
        document = entry.to_json()
        response = self._request(
            "PUT", f"/direct/{direct_key}", document, content_type="application/json"
        )
        self._stored(response, "direct entry upload", "key", direct_key)
        self.bytes_up += len(document)

    def put_inputs(self, key: str, document: bytes) -> None:
        """Store the inputs document of ``key`` (after its manifest)."""
        response = self._request("PUT", f"/inputs/{key}", document, content_type="application/json")
        self._stored(response, "inputs document upload", "key", key)
        self.bytes_up += len(document)

    def put_manifest(self, key: str, document: bytes) -> None:
        response = self._request(
            "PUT", f"/manifests/{key}", document, content_type="application/json"
        )
        self._stored(response, "manifest upload", "key", key)
        self.bytes_up += len(document)


class _Counted:
    """A response body as a file for the zstd reader, counting what it reads as downloaded."""

    def __init__(self, response: Response, remote: Remote) -> None:
        self._response = response
        self._remote = remote

    def read(self, size: int = -1) -> bytes:
        data = self._response.read(size if size >= 0 else _CHUNK)
        self._remote.bytes_down += len(data)
        return data
