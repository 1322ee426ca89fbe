"""NAR ingest: the checker thread sees every byte, in order, and its errors surface; a zstd
upload is kept as it came, any other compression re-encoded."""

from __future__ import annotations

import hashlib
import lzma
import threading

import pytest
import zstandard

from larder.core.ingest import PIPE_DEPTH, NarIngest
from larder.errors import FormatError, StorageFull
from larder.protocol.nar import write_nar
from larder.storage.base import BlobInfo, BlobWriter

NAR = write_nar({"type": "regular", "contents": bytes(range(256)) * 40_000})


class Recorder(BlobWriter):
    """Keeps what it is given, notes the threads it ran on, fails after ``fail_after`` bytes."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.data = bytearray()
        self.encoded = bytearray()
        self.threads: set[str] = set()
        self.fail_after = fail_after

    def write_encoded(self, piece: bytes) -> None:
        self.threads.add(threading.current_thread().name)
        self.encoded += piece

    def write(self, data: bytes | memoryview) -> None:
        self.threads.add(threading.current_thread().name)
        if self.fail_after is not None and len(self.data) >= self.fail_after:
            raise StorageFull("disk full")
        self.data += data

    @property
    def size(self) -> int:
        return len(self.data)

    def commit(
        self, expected_id: str | None = None, *, stored_sha256: bytes | None = None
    ) -> BlobInfo:
        raise AssertionError("not used")

    def abort(self) -> None:
        pass


def feed(ingest: NarIngest, body: bytes, chunk: int = 64 * 1024) -> None:
    for offset in range(0, len(body), chunk):
        ingest.feed(body[offset : offset + chunk])


def test_every_byte_reaches_the_writer_in_order_on_its_own_thread() -> None:
    writer = Recorder()
    upload = zstandard.ZstdCompressor(write_checksum=False).compress(NAR)
    ingest = NarIngest("zstd", writer)
    feed(ingest, upload)
    digest = ingest.finish()
    ingest.close()
    assert bytes(writer.data) == NAR  # complete once finish() returned
    assert bytes(writer.encoded) == upload  # a zstd upload is stored as it came
    assert digest.nar_sha256 == hashlib.sha256(NAR).digest()
    assert digest.file_sha256 == hashlib.sha256(upload).digest()
    assert writer.threads == {"larder-nar-check"}
    assert threading.current_thread().name not in writer.threads


@pytest.mark.parametrize("compression", ["xz", "none"])
def test_other_compressions_hand_over_only_the_nar(compression: str) -> None:
    writer = Recorder()
    upload = lzma.compress(NAR) if compression == "xz" else NAR
    ingest = NarIngest(compression, writer)
    feed(ingest, upload)
    digest = ingest.finish()
    ingest.close()
    assert bytes(writer.data) == NAR and not writer.encoded  # the writer encodes it itself
    assert digest.nar_size == len(NAR)
    assert digest.nar_sha256 == hashlib.sha256(NAR).digest()
    assert digest.file_sha256 == hashlib.sha256(upload).digest()


@pytest.mark.parametrize("compression", ["zstd", "none"])  # checked on either thread
def test_a_malformed_nar_in_a_valid_stream_fails_and_is_not_finished(compression: str) -> None:
    writer = Recorder()
    ingest = NarIngest(compression, writer)
    bad = NAR[:-200] + b"\0" * 200  # the framing breaks near the end
    with pytest.raises(FormatError):
        feed(ingest, zstandard.ZstdCompressor().compress(bad) if compression == "zstd" else bad)
        ingest.finish()
    ingest.close()


def test_a_writer_error_surfaces_in_feed_or_finish() -> None:
    writer = Recorder(fail_after=100_000)
    ingest = NarIngest("none", writer)
    with pytest.raises(StorageFull):
        feed(ingest, NAR, chunk=16 * 1024)  # more pieces than the queue holds
        ingest.finish()
    ingest.close()
    assert len(writer.data) < len(NAR)


def test_close_stops_the_thread_even_with_a_full_queue() -> None:
    gate = threading.Event()

    class Stalling(Recorder):
        def write(self, data: bytes | memoryview) -> None:
            gate.wait()
            super().write(data)

    writer = Stalling()
    ingest = NarIngest("none", writer)
    pieces = threading.Thread(target=feed, args=(ingest, NAR[: 256 * 1024 * PIPE_DEPTH]))
    pieces.start()
    gate.set()
    pieces.join()
    ingest.close()
    with pytest.raises(FormatError):  # closed: the decoder refuses more input
        ingest.feed(b"more")
    assert not any(t.name == "larder-nar-check" for t in threading.enumerate())
