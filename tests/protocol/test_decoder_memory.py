"""What each upload decoder needs, read from the stream's own headers, and the pause of a
Decompressor given an allowance until it is allowed that much (larder.core.decoding)."""

from __future__ import annotations

import lzma
import os
import shutil
import subprocess
import zlib

import pytest
import zstandard

from larder.errors import FormatError
from larder.protocol.compression import (
    XZ_MEMLIMIT,
    XZ_OVERHEAD,
    ZSTD_MAX_WINDOW,
    Compressor,
    Decompressor,
    decoder_need,
    lzma2_dict_size,
    xz_stream_need,
    zstd_frame_need,
)

DATA = os.urandom(4096) * 64 + bytes(100_000)
MiB = 1024 * 1024
#: Dictionary sizes of the xz presets (xz(1)).
PRESET_DICT = {0: 256 * 1024, 1: MiB, 3: 4 * MiB, 6: 8 * MiB, 9: 64 * MiB}


def xz(data: bytes, preset: int = 6, bcj: int | None = None, delta: bool = False) -> bytes:
    filters: list[dict[str, int]] = []
    if delta:
        filters.append({"id": lzma.FILTER_DELTA, "dist": 4})
    if bcj is not None:
        filters.append({"id": bcj})
    filters.append({"id": lzma.FILTER_LZMA2, "preset": preset})
    return lzma.compress(data, format=lzma.FORMAT_XZ, filters=filters)


def minimal_memlimit(stream: bytes) -> int:
    """The least memlimit liblzma decodes ``stream`` with."""
    low, high = 1, 1 << 31
    while low < high:
        middle = (low + high) // 2
        try:
            lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=middle).decompress(stream)
            high = middle
        except lzma.LZMAError:
            low = middle + 1
    return low


@pytest.mark.parametrize("preset", sorted(PRESET_DICT))
def test_xz_need_is_the_presets_dictionary(preset: int) -> None:
    stream = xz(DATA, preset)
    need = xz_stream_need(stream)
    assert need == PRESET_DICT[preset] + XZ_OVERHEAD
    # what liblzma really asks for, and not much less than what is reserved
    assert need - XZ_OVERHEAD < minimal_memlimit(stream) <= need
    # known from the headers alone, and not before them
    header_end = 12 + (stream[12] + 1) * 4
    assert xz_stream_need(stream[:header_end]) == need
    assert xz_stream_need(stream[: header_end - 1]) is None
    assert xz_stream_need(stream[:5]) is None


@pytest.mark.parametrize(
    "bcj",
    [lzma.FILTER_X86, lzma.FILTER_ARM, lzma.FILTER_ARMTHUMB, lzma.FILTER_POWERPC,
     lzma.FILTER_IA64, lzma.FILTER_SPARC],
)  # fmt: skip
@pytest.mark.parametrize("preset", [1, 6])
def test_xz_need_behind_bcj_and_delta_filters(bcj: int, preset: int) -> None:
    for stream in (xz(DATA, preset, bcj=bcj), xz(DATA, preset, bcj=bcj, delta=True)):
        need = xz_stream_need(stream)
        assert need == PRESET_DICT[preset] + XZ_OVERHEAD
        assert minimal_memlimit(stream) <= need


def test_xz_need_of_a_stream_without_blocks() -> None:
    empty = lzma.compress(b"", format=lzma.FORMAT_XZ)
    assert empty[12] == 0  # the index follows the stream header
    assert xz_stream_need(empty) == XZ_OVERHEAD


def test_xz_need_refuses_what_is_not_an_xz_stream() -> None:
    stream = xz(DATA)
    for bad in (
        b"\x00" * 20,
        stream[:7] + b"\x01" + stream[8:],  # an unsupported check: the header CRC fails
        stream[:14] + bytes([stream[14] ^ 1]) + stream[15:],  # block header CRC32
        lzma.compress(DATA, format=lzma.FORMAT_ALONE),
    ):
        with pytest.raises(ValueError):
            xz_stream_need(bad)


def test_lzma2_dictionary_sizes() -> None:
    assert lzma2_dict_size(0) == 4096
    assert lzma2_dict_size(1) == 6144
    assert lzma2_dict_size(22) == 8 * MiB
    assert lzma2_dict_size(40) == 0xFFFFFFFF
    with pytest.raises(ValueError):
        lzma2_dict_size(41)


def test_fixed_needs_are_small() -> None:
    assert decoder_need("xz") is None and decoder_need("zstd") is None
    for name in ("gzip", "deflate", "bzip2", "br"):
        need = decoder_need(name)
        assert need is not None and 0 < need <= 17 * MiB


# -- a Decompressor with an allowance --------------------------------------------------------


def drive(decoder: Decompressor, data: bytes, grant: int, chunk: int = 4096) -> list[int]:
    """Write ``data`` in chunks; each time the decoder pauses, note what it wants and grant
    ``grant`` (or what it wants, if less) and resume; the list of what it wanted."""
    asked: list[int] = []
    for start in range(0, len(data), chunk):
        decoder.write(data[start : start + chunk])
        while decoder.wants:
            asked.append(decoder.wants)
            decoder.resume(min(grant, decoder.wants) if grant else decoder.wants)
    decoder.finish()
    return asked


def zstd_frame(data: bytes, window_log: int) -> bytes:
    # no content size: the frame header gives the window (else a small frame's window is its size)
    params = zstandard.ZstdCompressionParameters.from_level(
        3, window_log=window_log, write_content_size=0
    )
    encoder = zstandard.ZstdCompressor(compression_params=params).compressobj()  # size unknown
    return encoder.compress(data) + encoder.flush()


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
def test_zstd_pauses_once_per_larger_frame_before_decoding_it(chunk: int) -> None:
    data = zstd_frame(DATA, 20) + zstd_frame(DATA, 23) + zstd_frame(DATA, 21)
    out: list[bytes] = []
    decoder = Decompressor("zstd", out.append, allowance=0)
    asked = drive(decoder, data, 0, chunk)
    assert asked == [zstd_frame_need(1 << 20), zstd_frame_need(1 << 23)]
    assert b"".join(out) == DATA * 3


def test_zstd_decodes_nothing_of_a_frame_until_it_is_allowed() -> None:
    first = zstd_frame(DATA, 20)
    out: list[bytes] = []
    decoder = Decompressor("zstd", out.append, allowance=zstd_frame_need(1 << 20))
    decoder.write(first + zstd_frame(b"second" * 1000, 24))
    assert decoder.wants == zstd_frame_need(1 << 24)
    assert b"".join(out) == DATA  # the first frame only
    with pytest.raises(ValueError):
        decoder.write(b"more")  # resume first
    decoder.resume(zstd_frame_need(1 << 23))  # not enough: still waiting
    assert decoder.wants == zstd_frame_need(1 << 24)
    decoder.resume(zstd_frame_need(1 << 24))
    assert not decoder.wants
    decoder.finish()
    assert b"".join(out) == DATA + b"second" * 1000


def test_zstd_window_beyond_the_limit_is_refused_before_asking() -> None:
    header = (0xFD2FB528).to_bytes(4, "little") + bytes([0x00, (28 - 10) << 3])  # 256 MiB
    decoder = Decompressor("zstd", lambda piece: None, allowance=0)
    with pytest.raises(FormatError, match=f"more than the {ZSTD_MAX_WINDOW} allowed"):
        decoder.write(header)
    assert not decoder.wants


@pytest.mark.parametrize("chunk", [1, 13, 4096])
def test_xz_pauses_for_each_stream_that_needs_more(chunk: int) -> None:
    data = xz(DATA, 1) + xz(DATA, 0) + xz(DATA, 6, bcj=lzma.FILTER_X86)
    out: list[bytes] = []
    decoder = Decompressor("xz", out.append, allowance=0)
    asked = drive(decoder, data, 0, chunk)
    assert asked == [MiB + XZ_OVERHEAD, 8 * MiB + XZ_OVERHEAD]
    assert b"".join(out) == DATA * 3


def _index_records(stream: bytes) -> list[tuple[int, int]]:
    """(unpadded size, uncompressed size) of each block of a Python-made xz stream."""
    backward = (int.from_bytes(stream[-8:-4], "little") + 1) * 4
    index = stream[-12 - backward : -12]
    records, pos = [], 2  # indicator, then a one-byte count here
    for _ in range(index[1]):
        fields = []
        for _ in range(2):
            value, shift = 0, 0
            while True:
                byte = index[pos]
                pos += 1
                value |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            fields.append(value)
        records.append((fields[0], fields[1]))
    return records


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def two_block_stream(small: bytes, large: bytes) -> bytes:
    """One xz stream whose first block comes from ``small`` and second from ``large``."""
    blocks, records = b"", []
    for stream in (small, large):
        [(unpadded, uncompressed)] = _index_records(stream)
        blocks += stream[12 : 12 + (unpadded + 3) // 4 * 4]
        records.append((unpadded, uncompressed))
    index = b"\x00" + _varint(2) + b"".join(_varint(u) + _varint(n) for u, n in records)
    index += bytes(-len(index) % 4)
    index += zlib.crc32(index).to_bytes(4, "little")
    flags = small[6:8]
    footer_body = ((len(index) // 4) - 1).to_bytes(4, "little") + flags
    footer = zlib.crc32(footer_body).to_bytes(4, "little") + footer_body + b"YZ"
    return small[:12] + blocks + index + footer


def test_a_later_xz_block_wanting_more_memory_fails_the_stream() -> None:
    first, second = os.urandom(5000), os.urandom(5000)
    joined = two_block_stream(xz(first, 0), xz(second, 9))
    assert lzma.decompress(joined) == first + second  # a valid stream
    decoder = Decompressor("xz", lambda piece: None, allowance=0)
    with pytest.raises(FormatError, match="xz: corrupt input"):
        drive(decoder, joined, 0)
    # allowed by the first block header's need only: the memlimit stops the second block
    assert xz_stream_need(joined) == PRESET_DICT[0] + XZ_OVERHEAD


def test_xz_asking_more_than_the_limit_is_refused_before_asking() -> None:
    stream = xz(DATA, 9)
    header_end = 12 + (stream[12] + 1) * 4
    head = bytearray(stream[:header_end])
    # raise the dictionary to 256 MiB (property 32) and fix the block header's CRC32
    block = head[12 : header_end - 4]
    at = block.index(b"\x21\x01") + 2
    block[at] = 32
    head[12 : header_end - 4] = block
    head[header_end - 4 : header_end] = zlib.crc32(block).to_bytes(4, "little")
    assert xz_stream_need(bytes(head)) == 256 * MiB + XZ_OVERHEAD > XZ_MEMLIMIT
    decoder = Decompressor("xz", lambda piece: None, allowance=0)
    with pytest.raises(FormatError, match="more than"):
        decoder.write(bytes(head))
    assert not decoder.wants


@pytest.mark.parametrize("compression", ["gzip", "bzip2", "br"])
def test_fixed_needs_are_asked_before_each_stream(compression: str) -> None:
    parts: list[bytes] = []
    streams = 1 if compression == "br" else 2  # brotli streams do not concatenate
    for _ in range(streams):
        encoder = Compressor(compression, parts.append)
        encoder.write(DATA)
        encoder.finish()
    out: list[bytes] = []
    decoder = Decompressor(compression, out.append, allowance=0)
    assert drive(decoder, b"".join(parts), 0) == [decoder_need(compression)]
    assert b"".join(out) == DATA * streams


def test_truncated_xz_headers_are_truncated_input() -> None:
    stream = xz(DATA)
    decoder = Decompressor("xz", lambda piece: None, allowance=1 << 30)
    decoder.write(stream[:20])
    assert not decoder.wants
    with pytest.raises(FormatError, match="input is truncated"):
        decoder.finish()
    decoder = Decompressor("xz", lambda piece: None, allowance=1 << 30)
    decoder.write(stream + stream[:8])
    with pytest.raises(FormatError, match="data after stream 1 is not a stream"):
        decoder.finish()


@pytest.mark.skipif(shutil.which("xz") is None, reason="no xz command")
@pytest.mark.parametrize(
    ("args", "dict_size"),
    [
        (["-T2", "--block-size=100KiB"], 8 * MiB),  # blocks carry their sizes in their headers
        (["-0", "--check=sha256"], 256 * 1024),
        (["--x86", "--lzma2=dict=3MiB"], 3 * MiB),
    ],
)
def test_xz_need_of_the_xz_command(args: list[str], dict_size: int) -> None:
    stream = subprocess.run(["xz", "-c", *args], input=DATA, capture_output=True, check=True).stdout
    assert xz_stream_need(stream) == dict_size + XZ_OVERHEAD
    out: list[bytes] = []
    decoder = Decompressor("xz", out.append, allowance=0)
    assert drive(decoder, stream, 0) == [dict_size + XZ_OVERHEAD]
    assert b"".join(out) == DATA
