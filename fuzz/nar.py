"""Fuzz target: the streaming NAR reader (``NarValidator``) behind the upload decompressors.

Input layout: byte 0 picks the compression (bits 0-1: none, xz, bzip2, zstd) and how the
stream is cut into chunks (bits 2-7 seed the chunk sizes); the rest is the upload body. It goes
through ``Decompressor`` into ``NarValidator`` in those chunks, as ``NarIngest`` feeds it.

Invariant: every input ends in ``finish()`` returning or a ``FormatError``; and for the
uncompressed form the verdict (accepted, or the exact error message) does not depend on how the
stream was cut: one chunk, the fuzzed cuts and single bytes all agree.
"""

from __future__ import annotations

import random

from fuzz.common import instrumented, main

with instrumented():
    from larder.errors import FormatError
    from larder.protocol.compression import Decompressor
    from larder.protocol.nar import NarValidator

COMPRESSIONS = ("none", "xz", "bzip2", "zstd")
BYTEWISE_LIMIT = 4096  # byte-at-a-time feeding of longer inputs only costs time


def _cuts(size: int, seed: int) -> list[int]:
    """Chunk boundaries for ``size`` bytes: 0 = one chunk, otherwise sizes from ``seed``."""
    if seed == 0:
        return [size]
    rng = random.Random(seed)
    cuts, pos = [], 0
    while pos < size:
        step = rng.choice((1, 7, 8, 9, 16, 63, 64, 65, 256, 4096))
        cuts.append(min(step, size - pos))
        pos += step
    return cuts


def _verdict(compression: str, body: bytes, cuts: list[int]) -> str:
    validator = NarValidator()
    decoder = Decompressor(compression, validator.feed, chunk_size=1024)
    try:
        pos = 0
        for length in cuts:
            decoder.write(body[pos : pos + length])
            pos += length
        decoder.finish()
        validator.finish()
    except FormatError as exc:
        return f"error: {exc.message}"
    finally:
        decoder.close()
    assert validator.done and validator.size > 0
    return "ok"


def one_input(data: bytes) -> None:
    if not data:
        return
    compression = COMPRESSIONS[data[0] & 3]
    seed = data[0] >> 2
    body = data[1:]
    verdict = _verdict(compression, body, _cuts(len(body), seed))
    if compression != "none":
        return
    whole = _verdict("none", body, [len(body)]) if seed else verdict
    assert verdict == whole, f"chunking changed the verdict: {verdict!r} vs {whole!r}"
    if len(body) <= BYTEWISE_LIMIT:
        bytewise = _verdict("none", body, [1] * len(body))
        assert bytewise == whole, f"byte-wise feeding differs: {bytewise!r} vs {whole!r}"


if __name__ == "__main__":
    main(one_input)
