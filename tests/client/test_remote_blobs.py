"""Downloads read a stored blob whatever encoder wrote it: one frame, several, skippable ones;
and refuse bytes that do not decode or do not hash to the blob's name."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import blake3
import pytest
import zstandard

from larder.client.remote import Remote, RemoteError

DATA = os.urandom(300_000) + b"fn main() {}\n" * 50_000
SKIPPABLE = (0x184D2A50).to_bytes(4, "little") + (2).to_bytes(4, "little") + b"hi"


def frames(data: bytes, parts: int) -> bytes:
    step = -(-len(data) // parts)
    compressor = zstandard.ZstdCompressor(level=1)
    return SKIPPABLE.join(
        compressor.compress(data[i : i + step]) for i in range(0, len(data), step)
    )


@pytest.fixture
def served() -> Iterator[tuple[str, dict[str, bytes]]]:
    """A cache answering ``GET .../blobs/<id>`` with the body set for that id."""
    bodies: dict[str, bytes] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            body = bodies.get(self.path.rsplit("/", 1)[1])
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/main", bodies
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("parts", [1, 2, 7])
def test_every_frame_of_a_stream_is_read(served: tuple[str, dict[str, bytes]], parts: int) -> None:
    url, bodies = served
    name = blake3.blake3(DATA).hexdigest()
    bodies[name] = frames(DATA, parts)
    out = io.BytesIO()
    remote = Remote(url, None, 5.0, {})
    try:
        assert remote.download_blob(name, out) == len(DATA)
    finally:
        remote.close()
    assert out.getvalue() == DATA


@pytest.mark.parametrize(
    "body",
    [frames(DATA, 2)[:-50], frames(DATA, 1) + b"junk after it", frames(DATA[:-1], 2)],
    ids=["truncated", "trailing-junk", "other-bytes"],
)
def test_a_stream_that_is_not_the_blob_is_corrupt(
    served: tuple[str, dict[str, bytes]], body: bytes
) -> None:
    url, bodies = served
    name = blake3.blake3(DATA).hexdigest()
    bodies[name] = body
    remote = Remote(url, None, 5.0, {})
    try:
        with pytest.raises(RemoteError) as caught:
            remote.download_blob(name, io.BytesIO())
    finally:
        remote.close()
    assert caught.value.kind == "corrupt"
