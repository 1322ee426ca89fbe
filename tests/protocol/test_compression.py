"""Compression: real compressed NARs from `nix copy`, malformed input, chunking, bombs."""

from __future__ import annotations

import bz2
import hashlib
import lzma
import re
import tracemalloc
import zlib
from collections.abc import Iterable
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from larder.errors import FormatError
from larder.protocol import narinfo
from larder.protocol.compression import (
    COMPRESSIONS,
    Compressor,
    Decompressor,
    compression_for_extension,
    zstd_window_size,
)
from larder.protocol.nar import NarValidator

from .conftest import COMPRESSED_DIRS, FIXTURES, fixture_id

ALL = sorted(COMPRESSIONS)
CODECS = ("xz", "zstd", "bzip2")


def decompress(
    compression: str, data: bytes, splits: Iterable[int] = (), chunk_size: int = 256 * 1024
) -> list[bytes]:
    pieces: list[bytes] = []
    decompressor = Decompressor(compression, pieces.append, chunk_size=chunk_size)
    start = 0
    for cut in sorted(set(splits)):
        decompressor.write(data[start:cut])
        start = cut
    decompressor.write(data[start:])
    decompressor.finish()
    return pieces


def compress(compression: str, data: bytes, level: int | None = None) -> bytes:
    pieces: list[bytes] = []
    compressor = Compressor(compression, pieces.append, level)
    compressor.write(data)
    compressor.finish()
    return b"".join(pieces)


def compressed_narinfos() -> list[Path]:
    return sorted(p for d in COMPRESSED_DIRS for p in (FIXTURES / d).glob("*.narinfo"))


@pytest.mark.parametrize("path", compressed_narinfos(), ids=fixture_id)
def test_real_compressed_nars(path: Path) -> None:
    info = narinfo.parse(path.read_bytes())
    data = (path.parent / info.url).read_bytes()
    assert compression_for_extension(Path(info.url).suffix) == info.compression
    for splits in ((), range(1, len(data)), range(0, len(data), 7)):
        pieces = decompress(info.compression, data, splits, chunk_size=100)
        assert all(0 < len(p) <= 100 for p in pieces)
        nar = b"".join(pieces)
        assert hashlib.sha256(nar).digest() == info.nar_hash.digest
        assert len(nar) == info.nar_size
        validator = NarValidator()
        validator.feed(nar)
        validator.finish()


def test_extensions() -> None:
    known = ("", ".xz", ".bz2", ".zst", ".br", ".gz")
    assert {ext: compression_for_extension(ext) for ext in known} == {
        "": "none",
        ".xz": "xz",
        ".bz2": "bzip2",
        ".zst": "zstd",
        ".br": "br",
        ".gz": "gzip",
    }
    for bad in (".lz4", ".lzip", "xz", ".XZ", ".zstd", ".xz.xz"):
        with pytest.raises(FormatError, match=r"unsupported NAR file extension .*supported: none"):
            compression_for_extension(bad)


@pytest.mark.parametrize("name", ["lz4", "lzip", "", "XZ", "compress"])
def test_unsupported_compression(name: str) -> None:
    with pytest.raises(FormatError, match="unsupported compression"):
        Decompressor(name, lambda _: None)
    with pytest.raises(FormatError, match="unsupported compression"):
        Compressor(name, lambda _: None)


def test_deflate_is_a_decoder_only() -> None:
    """HTTP's ``deflate`` (zlib, RFC 1950) decodes; no NAR is ever written in it."""
    pieces: list[bytes] = []
    decoder = Decompressor("deflate", pieces.append)
    decoder.write(zlib.compress(SAMPLE))
    decoder.finish()
    assert b"".join(pieces) == SAMPLE
    with pytest.raises(FormatError, match="unsupported compression"):
        Compressor("deflate", lambda _: None)


@pytest.mark.parametrize("compression", ["gzip", "br", "deflate"])
def test_http_codings_refuse_trailing_and_truncated_input(compression: str) -> None:
    encoded = zlib.compress(SAMPLE) if compression == "deflate" else _encode(compression, SAMPLE)
    for bad in (encoded + b"junk", encoded[:-3], b"", b"not compressed at all"):
        decoder = Decompressor(compression, lambda _: None)
        with pytest.raises(FormatError):
            decoder.write(bad)
            decoder.finish()


def test_brotli_output_stays_in_bounded_pieces() -> None:
    """A small brotli input that expands enormously reaches the sink in pieces of at most
    ``chunk_size`` bytes (brotli's own output buffer may overshoot; larder slices it)."""
    bomb = _encode("br", b"\0" * (64 * 1024 * 1024))
    assert len(bomb) < 64 * 1024
    sizes: list[int] = []
    decoder = Decompressor("br", lambda piece: sizes.append(len(piece)), chunk_size=1 << 16)
    decoder.write(bomb)
    decoder.finish()
    assert sum(sizes) == 64 * 1024 * 1024
    assert max(sizes) <= 1 << 16


def _encode(compression: str, data: bytes) -> bytes:
    pieces: list[bytes] = []
    encoder = Compressor(compression, pieces.append)
    encoder.write(data)
    encoder.finish()
    return b"".join(pieces)


SAMPLE = b"".join(b"line %d of a sample NAR-ish payload\n" % i for i in range(3000))


@pytest.mark.parametrize("compression", ALL)
def test_none_and_codecs_round_trip(compression: str) -> None:
    data = compress(compression, SAMPLE)
    if compression == "none":
        assert data == SAMPLE
    pieces = decompress(compression, data, chunk_size=1000)
    assert b"".join(pieces) == SAMPLE
    assert max(len(p) for p in pieces) <= 1000


@pytest.mark.parametrize("compression", CODECS)
def test_concatenated_streams(compression: str) -> None:
    one = compress(compression, SAMPLE)
    two = compress(compression, b"second")
    assert b"".join(decompress(compression, one + two + one)) == SAMPLE + b"second" + SAMPLE


def test_zstd_skippable_frames_and_empty_frames() -> None:
    skippable = (0x184D2A5A).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"hello"
    empty = zstandard.ZstdCompressor().compress(b"")
    frame = zstandard.ZstdCompressor(write_checksum=True).compress(SAMPLE)
    data = skippable + frame + empty + skippable
    for splits in ((), range(1, len(data))):
        assert b"".join(decompress("zstd", data, splits)) == SAMPLE


def test_zstd_frames_without_content_size() -> None:
    pieces: list[bytes] = []
    cobj = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    pieces.append(cobj.compress(SAMPLE))
    pieces.append(cobj.flush())
    assert b"".join(decompress("zstd", b"".join(pieces))) == SAMPLE


def test_none_passes_through_in_chunks() -> None:
    assert decompress("none", b"abcdefghij", chunk_size=4) == [b"abcd", b"efgh", b"ij"]
    assert decompress("none", b"") == []
    out: list[bytes] = []
    d = Decompressor("none", out.append, chunk_size=4)
    d.write(bytearray(b"abcdef"))
    d.write(memoryview(b"gh"))
    d.finish()
    assert out == [b"abcd", b"ef", b"gh"] and all(type(p) is bytes for p in out)


def _corrupt(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0x55 for b in data[middle : middle + 16]) + data[middle + 16 :]


MALFORMED: list[tuple[str, str, bytes, str]] = []
for _codec in CODECS:
    _good = compress(_codec, SAMPLE)
    MALFORMED += [
        (f"{_codec} empty", _codec, b"", f"{_codec}: input is empty"),
        (f"{_codec} truncated", _codec, _good[:-1], f"{_codec}: input is truncated"),
        (f"{_codec} half", _codec, _good[: len(_good) // 2], f"{_codec}: "),
        (f"{_codec} header only", _codec, _good[:6], f"{_codec}: input is truncated"),
        (f"{_codec} garbage", _codec, b"this is not compressed at all", f"{_codec}: "),
        (f"{_codec} trailing garbage", _codec, _good + b"garbage!" * 4, f"{_codec}: "),
        (f"{_codec} trailing byte", _codec, _good + b"\x01", f"{_codec}: "),
        (f"{_codec} corrupt", _codec, _corrupt(_good), f"{_codec}: "),
    ]
MALFORMED += [
    ("xz given zstd", "xz", compress("zstd", SAMPLE), "xz: corrupt input"),
    ("zstd given xz", "zstd", compress("xz", SAMPLE), "zstd: "),
    ("bzip2 given xz", "bzip2", compress("xz", SAMPLE), "bzip2: corrupt input"),
    ("lzma alone", "xz", lzma.compress(SAMPLE, format=lzma.FORMAT_ALONE), "xz: corrupt input"),
    ("zstd reserved bit", "zstd", b"\x28\xb5\x2f\xfd\x08" + bytes(20), "reserved bit set"),
    ("zstd after frame", "zstd", compress("zstd", SAMPLE) + b"\0\0\0\0", "zstd: "),
]


@pytest.mark.parametrize(
    ("compression", "data", "message"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_malformed(compression: str, data: bytes, message: str) -> None:
    for splits in ((), range(1, len(data), 3)):
        with pytest.raises(FormatError, match=re.escape(message)):
            decompress(compression, data, splits)


def test_zstd_framing_messages() -> None:
    """Fed whole, framing problems are named by the frame tracker (split input may instead get
    zstd's own message, as the library checks magic numbers byte by byte)."""
    good = compress("zstd", SAMPLE)
    with pytest.raises(FormatError, match="zstd: input at byte 0 is not a zstd frame"):
        decompress("zstd", compress("xz", SAMPLE))
    with pytest.raises(FormatError, match=f"data after the last frame at byte {len(good)} is not"):
        decompress("zstd", good + bytes(4))


def test_errors_stick_and_sink_errors_pass_through() -> None:
    d = Decompressor("xz", lambda _: None)
    with pytest.raises(FormatError):
        d.write(b"not xz at all, not at all")
    with pytest.raises(FormatError):
        d.write(compress("xz", b"x"))
    with pytest.raises(FormatError):
        d.finish()

    def refuse(_: bytes) -> None:
        raise FormatError("the sink says no")

    for codec in ALL:
        d = Decompressor(codec, refuse)
        with pytest.raises(FormatError, match="the sink says no"):
            d.write(compress(codec, SAMPLE))

    def explode(_: bytes) -> None:
        raise KeyError("boom")

    d = Decompressor("zstd", explode)
    with pytest.raises(KeyError):
        d.write(compress("zstd", SAMPLE))
    with pytest.raises(FormatError, match="an earlier write failed"):
        d.write(b"")


@pytest.mark.parametrize("compression", ALL)
@settings(max_examples=30, deadline=None)
@given(
    data=st.binary(max_size=3000).map(lambda b: b * 3),
    chunk_size=st.integers(1, 2048),
    cuts=st.lists(st.integers(0, 1 << 16), max_size=20),
)
def test_chunking_invariance(
    compression: str, data: bytes, chunk_size: int, cuts: list[int]
) -> None:
    compressed = compress(compression, data)
    splits = [c % (len(compressed) + 1) for c in cuts]
    pieces = decompress(compression, compressed, splits, chunk_size=chunk_size)
    assert b"".join(pieces) == data
    assert all(0 < len(p) <= chunk_size for p in pieces)


@pytest.mark.parametrize("compression", CODECS)
@settings(max_examples=30, deadline=None)
@given(
    data=st.binary(min_size=1, max_size=400), cut=st.integers(0, 1 << 16), flip=st.integers(1, 255)
)
def test_damage_raises_format_error_only(
    compression: str, data: bytes, cut: int, flip: int
) -> None:
    compressed = bytearray(compress(compression, data))
    compressed[cut % len(compressed)] ^= flip
    try:
        result = b"".join(decompress(compression, bytes(compressed)))
    except FormatError:
        return
    assert result == data  # a flip that went unnoticed did not change the data


# -- decompression bombs ----------------------------------------------------------------------

GIB = 1 << 30
ZEROS = bytes(1 << 20)


def bomb(compression: str) -> bytes:
    """Compressed input expanding to 1 GiB of zeros, compressed as a stream here.

    zstd compresses the whole GiB in well under a second; xz and bzip2 take about 12 s per GiB on
    zeros, so for them one 128 MiB stream is made and repeated 8 times (both formats concatenate
    streams): still a single stream that expands more than 2000-fold.
    """
    total = GIB if compression == "zstd" else GIB // 8
    pieces: list[bytes] = []
    compressor = Compressor(
        compression, pieces.append, level={"zstd": 3, "xz": 0, "bzip2": 1}[compression]
    )
    for _ in range(total // len(ZEROS)):
        compressor.write(ZEROS)
    compressor.finish()
    stream = b"".join(pieces)
    return stream * (GIB // total)


@pytest.mark.parametrize("compression", CODECS)
def test_decompression_bomb_is_streamed_in_bounded_pieces(compression: str) -> None:
    data = bomb(compression)
    assert len(data) < 2 * 1024 * 1024
    chunk_size = 256 * 1024
    seen = {"total": 0, "max": 0}

    def sink(piece: bytes) -> None:
        seen["total"] += len(piece)
        seen["max"] = max(seen["max"], len(piece))

    tracemalloc.start()
    try:
        decompressor = Decompressor(compression, sink, chunk_size=chunk_size)
        for start in range(0, len(data), 64 * 1024):
            decompressor.write(data[start : start + 64 * 1024])
        decompressor.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen["total"] == GIB
    assert seen["max"] <= chunk_size
    assert peak < 32 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB"


def test_zstd_window_limit() -> None:
    """A frame that needs a window above 128 MiB is refused instead of allocating it."""
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=28)
    cobj = zstandard.ZstdCompressor(compression_params=params).compressobj()
    data = cobj.compress(SAMPLE) + cobj.flush()
    assert zstandard.get_frame_parameters(data).window_size == 1 << 28
    with pytest.raises(FormatError, match="zstd: corrupt input"):
        decompress("zstd", data)


def _zstd_frame(data: bytes, window_log: int | None = None, checksum: bool = False) -> bytes:
    """One frame; with ``window_log``, compressed without a content size so the window stays."""
    if window_log is None:
        return zstandard.ZstdCompressor(write_checksum=checksum).compress(data)
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=window_log)
    cobj = zstandard.ZstdCompressor(compression_params=params).compressobj()
    return cobj.compress(data) + cobj.flush()


@given(
    size=st.sampled_from([0, 1, 255, 256, 300, 65535, 65536 + 255, 65536 + 256, 70_000]),
    window_log=st.sampled_from([None, 10, 17, 20, 23, 24, 27]),
    checksum=st.booleans(),
)
@settings(max_examples=60, deadline=None)
def test_zstd_window_size_agrees_with_libzstd(
    size: int, window_log: int | None, checksum: bool
) -> None:
    """Window descriptors and each size of Frame_Content_Size (single-segment frames) read as
    libzstd reads them."""
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    frame = _zstd_frame(data, window_log, checksum)
    descriptor = frame[4]
    single = bool(descriptor & 0x20)
    header_size = (0 if single else 1) + (0, 1, 2, 4)[descriptor & 3]
    header_size += ((1 if single else 0), 2, 4, 8)[descriptor >> 6]
    expected = zstandard.get_frame_parameters(frame).window_size
    assert zstd_window_size(descriptor, frame[5 : 5 + header_size]) == expected


@pytest.mark.parametrize(
    ("descriptor", "fields"),
    [
        (0x01, bytes([0x58]) + b"\x07"),  # window 2^21, 1-byte dictionary id
        (0x02, bytes([0x8B]) + b"\x01\x02"),  # window with a mantissa, 2-byte id
        (0x23, b"\x01\x02\x03\x04" + b"\x99"),  # single segment, 4-byte id, 1-byte size
        (0x61, b"\x05" + b"\x10\x27"),  # single segment, 1-byte id, 2-byte size (+256)
        (0xA2, b"\x05\x06" + (70_000).to_bytes(4, "little")),  # 4-byte size
    ],
)
def test_zstd_window_size_skips_dictionary_ids(descriptor: int, fields: bytes) -> None:
    header = (0xFD2FB528).to_bytes(4, "little") + bytes([descriptor]) + fields
    expected = zstandard.get_frame_parameters(header).window_size
    assert zstd_window_size(descriptor, fields) == expected


def test_a_frame_past_the_window_limit_is_refused_before_it_is_decoded() -> None:
    small = _zstd_frame(SAMPLE, window_log=20)
    large = _zstd_frame(SAMPLE, window_log=24)
    decoded: list[bytes] = []
    within = Decompressor("zstd", decoded.append, max_window=1 << 20)
    within.write(small + small)
    within.finish()
    assert b"".join(decoded) == SAMPLE * 2  # exactly at the limit is allowed
    for stream, frame in ((large, 1), (small + large, 2)):
        decoded.clear()
        limited = Decompressor("zstd", decoded.append, max_window=1 << 20)
        with pytest.raises(FormatError, match=f"frame {frame} .*window of {1 << 24} bytes"):
            for start in range(0, len(stream), 7):  # headers split across writes
                limited.write(stream[start : start + 7])
        assert b"".join(decoded) == (SAMPLE if frame == 2 else b"")
    # Without a limit, the decoder's own (128 MiB) applies.
    assert b"".join(decompress("zstd", small + large)) == SAMPLE * 2


def test_stdlib_sanity_bz2_and_lzma_vectors() -> None:
    """Inputs made by the standard library's one-shot functions decode identically."""
    assert b"".join(decompress("xz", lzma.compress(SAMPLE))) == SAMPLE
    assert b"".join(decompress("bzip2", bz2.compress(SAMPLE))) == SAMPLE
    assert b"".join(decompress("zstd", zstandard.compress(SAMPLE))) == SAMPLE
