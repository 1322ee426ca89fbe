"""Upload pipelines free their decoders and encoders as soon as they are done.

The zstd stream writer is invisible to the garbage collector; a sink that is a bound method of
the decoder's owner used to make a cycle nothing could free, so every .nar.zst upload kept its
decoder window and blob writer for the life of the process.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import zstandard

from larder.core.ingest import NarIngest
from larder.errors import FormatError
from larder.protocol.compression import Decompressor
from larder.protocol.nar import write_nar
from larder.storage.memory import MemoryStorage

NAR = write_nar({"type": "regular", "contents": b"x" * 100_000})


class Owner:
    """Holds a decompressor whose sink is one of its own methods (the cycle)."""

    def __init__(self) -> None:
        self.got = 0
        self.decoder = Decompressor("zstd", self.take)

    def take(self, data: bytes) -> None:
        self.got += len(data)


def gone(ref: weakref.ref[object]) -> bool:
    gc.collect()
    return ref() is None


def test_finished_decompressor_releases_its_owner() -> None:
    owner = Owner()
    owner.decoder.write(zstandard.ZstdCompressor().compress(b"y" * 1000))
    owner.decoder.finish()
    assert owner.got == 1000
    ref = weakref.ref(owner)
    del owner
    assert gone(ref)


def test_failed_decompressor_releases_its_owner() -> None:
    owner = Owner()
    owner.decoder.write(zstandard.ZstdCompressor().compress(b"y" * 1000)[:-5])
    with pytest.raises(FormatError, match="truncated"):
        owner.decoder.finish()
    ref = weakref.ref(owner)
    del owner
    assert gone(ref)


def test_closed_decompressor_refuses_writes() -> None:
    owner = Owner()
    owner.decoder.close()
    with pytest.raises(FormatError, match="closed"):
        owner.decoder.write(b"more")


@pytest.mark.parametrize("complete", [True, False])
def test_nar_ingest_and_blob_writer_are_freed(complete: bool) -> None:
    storage = MemoryStorage()
    writer = storage.blob_writer(encoded=True)
    ingest = NarIngest("zstd", writer)
    data = zstandard.ZstdCompressor().compress(NAR)
    ingest.feed(data if complete else data[: len(data) // 2])
    if complete:
        ingest.finish()
        writer.commit()
    else:
        ingest.close()
        writer.abort()
    refs = [weakref.ref(ingest), weakref.ref(writer)]
    del ingest, writer
    assert all(gone(ref) for ref in refs)
