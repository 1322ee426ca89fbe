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
        remote.download_blob(name, out, len(DATA))
    finally:
        remote.close()
    assert out.getvalue() == DATA


@pytest.mark.parametrize(
    ("body", "stated"),
    [
        (frames(DATA, 2)[:-50], len(DATA)),
        (frames(DATA, 1) + b"junk after it", len(DATA)),
        (frames(DATA[:-1], 2), len(DATA)),
        (frames(DATA, 2), len(DATA) - 1),
        (frames(DATA, 2), len(DATA) + 1),
    ],
    ids=["truncated", "trailing-junk", "other-bytes", "larger-than-stated", "smaller-than-stated"],
)
def test_a_stream_that_is_not_the_blob_is_corrupt(
    served: tuple[str, dict[str, bytes]], body: bytes, stated: int
) -> None:
    url, bodies = served
    name = blake3.blake3(DATA).hexdigest()
    bodies[name] = body
    remote = Remote(url, None, 5.0, {})
    try:
        with pytest.raises(RemoteError) as caught:
            remote.download_blob(name, io.BytesIO(), stated)
    finally:
        remote.close()
    assert caught.value.kind == "corrupt"


def test_a_stream_decoding_past_its_stated_size_is_cut_off_there(
    served: tuple[str, dict[str, bytes]],
) -> None:
    """64 KiB of zstd that decodes to 4 GiB: the download stops one piece past what the
    manifest states instead of decoding (and writing) it all."""
    url, bodies = served
    compressor = zstandard.ZstdCompressor(level=19)
    chunk = compressor.compress(b"\0" * (64 << 20))
    name = "0" * 64
    bodies[name] = chunk * 64  # 64 frames of 64 MiB of zeros
    assert len(bodies[name]) < 1 << 20

    class Sink(io.RawIOBase):
        written = 0

        def writable(self) -> bool:
            return True

        def write(self, data: object) -> int:
            size = len(data)  # type: ignore[arg-type]
            self.written += size
            return size

    sink = Sink()
    remote = Remote(url, None, 5.0, {})
    try:
        with pytest.raises(RemoteError, match="larger than stated") as caught:
            remote.download_blob(name, sink, 1 << 20)  # type: ignore[arg-type]
    finally:
        remote.close()
    assert caught.value.kind == "corrupt"
    assert sink.written <= 1 << 20
