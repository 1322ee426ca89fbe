"""The compressions Nix uses for NARs, as streaming codecs with bounded memory.

Spec: Nix ``src/libutil/compression.cc`` and ``src/libstore/binary-cache-store.cc``. A binary
cache stores ``nar/<FileHash>.nar<ext>`` compressed as the narinfo's ``Compression`` says; the
names Nix writes, and the extensions it gives them, are:

    none  -> .nar        xz -> .nar.xz        bzip2 -> .nar.bz2        zstd -> .nar.zst
    br    -> .nar.br     gzip -> .nar (sic: Nix gives gzip no extension; .nar.gz is read too)

(Nix can also write ``lz4`` and ``lzip`` through libarchive; larder does not accept those and
says so.) Like Nix's decoders, :class:`Decompressor` reads concatenated streams (xz with
``LZMA_CONCATENATED``, several bzip2 streams, several gzip members, several zstd frames including
skippable ones); a brotli stream is one stream. ``deflate`` (the zlib format, RFC 1950) exists
for HTTP's ``Content-Encoding`` only.

:class:`Decompressor` is a push decoder built for untrusted uploads: it hands its output to a
``sink`` in pieces of at most ``chunk_size`` bytes, so a small input that expands enormously (a
decompression bomb) never builds a large buffer; its decoders' own memory is capped (xz at
:data:`XZ_MEMLIMIT`, zstd windows at :data:`ZSTD_MAX_WINDOW`, the zstd CLI's default limit).
Corrupt, truncated or trailing data raises :class:`FormatError`; exceptions raised by the sink
pass through unchanged.

Given an ``allowance``, a :class:`Decompressor` also tells its caller how much memory each of its
decoders needs before it makes one (:func:`decoder_need`, :func:`xz_stream_need`; zstd: the
frame's window), and pauses until the caller allows that much: a server can then bound what all
its uploads' decoders hold together, waiting for that memory without blocking a thread.
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Final, Protocol, TypeVar, cast

import brotli
import zstandard

from larder.errors import FormatError

if TYPE_CHECKING:
    from typing_extensions import Buffer

COMPRESSIONS: Final[dict[str, str]] = {
    "none": "",
    "xz": ".xz",
    "bzip2": ".bz2",
    "zstd": ".zst",
    "br": ".br",
    "gzip": ".gz",
}
#: Decoders beyond the NAR compressions (HTTP content codings only).
_DECODE_ONLY: Final = ("deflate",)
GZIP_MAGIC: Final = b"\x1f\x8b"
DEFAULT_CHUNK_SIZE: Final = 256 * 1024
XZ_MEMLIMIT: Final = 128 * 1024 * 1024
ZSTD_MAX_WINDOW: Final = 1 << 27
#: What liblzma needs beyond an xz stream's LZMA2 dictionary (measured: 64 KiB and 56 bytes
#: with any preset; the BCJ filters add a few KiB), with room to spare.
XZ_OVERHEAD: Final = 256 * 1024
#: What zstd's streaming decoder needs beyond a frame's window: its context, the input block
#: and the output slack (``ZSTD_estimateDStreamSize``: about 2 * 128 KiB + 160 KiB).
ZSTD_OVERHEAD: Final = 512 * 1024
#: The memory of the decoders whose need does not depend on the stream (or hardly): zlib's
#: 32 KiB window and state, bzip2's largest blocks (``-9``: about 3.6 MiB), brotli's largest
#: window (16 MiB; larger windows are refused by the decoder) and its tables.
_FIXED_NEED: Final = {
    "none": 0,
    "gzip": 64 * 1024,
    "deflate": 64 * 1024,
    "bzip2": 4 * 1024 * 1024,
    "br": 17 * 1024 * 1024,
}

_BY_EXTENSION: Final = {ext: name for name, ext in COMPRESSIONS.items()}

Sink = Callable[[bytes], None]
_T = TypeVar("_T")


def _supported() -> str:
    return ", ".join(f"{name} ({ext or 'no extension'})" for name, ext in COMPRESSIONS.items())


def check_compression(compression: str, *, decoding: bool = False) -> str:
    """Return ``compression`` if larder supports it (``decoding``: as a decoder, which also
    knows ``deflate``), else raise :class:`FormatError`."""
    if compression not in COMPRESSIONS and not (decoding and compression in _DECODE_ONLY):
        raise FormatError(f"unsupported compression {compression!r}; supported: {_supported()}")
    return compression


def compression_for_extension(ext: str) -> str:
    """The compression named by a NAR file extension (``""``, ``.xz``, ``.bz2``, ``.zst``)."""
    try:
        return _BY_EXTENSION[ext]
    except KeyError:
        raise FormatError(
            f"unsupported NAR file extension {ext[:20]!r}; supported: {_supported()}"
        ) from None


def decoder_need(compression: str) -> int | None:
    """The memory a decoder of ``compression`` holds whatever the stream, or ``None`` when its
    stream says (xz: :func:`xz_stream_need`, zstd: each frame's window)."""
    return _FIXED_NEED.get(compression)


def zstd_frame_need(window: int) -> int:
    """The memory zstd's streaming decoder holds for a frame with this window."""
    return window + ZSTD_OVERHEAD


XZ_MAGIC: Final = b"\xfd7zXZ\x00"
_XZ_STREAM_HEADER: Final = 12
_LZMA2_FILTER: Final = 0x21


def _xz_varint(data: bytes, pos: int) -> tuple[int, int]:
    """An xz multibyte integer at ``pos`` (at most 9 bytes) and the position after it."""
    value = 0
    for i in range(9):
        if pos >= len(data):
            raise ValueError("the block header ends inside a number")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if byte == 0 and i:
                raise ValueError("a number is not in its shortest form")
            return value, pos
    raise ValueError("a number is longer than 9 bytes")


def lzma2_dict_size(prop: int) -> int:
    """The dictionary size an LZMA2 filter's one-byte property gives (xz-file-format 5.3.1)."""
    if prop & 0xC0 or prop > 40:
        raise ValueError(f"LZMA2 dictionary size property {prop} is invalid")
    if prop == 40:
        return 0xFFFFFFFF
    return (2 | (prop & 1)) << (prop // 2 + 11)


def xz_stream_need(head: bytes) -> int | None:
    """The memory decoding the xz stream that ``head`` begins needs, from its stream header and
    its first block's header (the LZMA2 filter's dictionary size, plus :data:`XZ_OVERHEAD`);
    ``None`` when ``head`` is too short to tell (at most 12 + 1024 bytes are needed).

    A stream with no block needs :data:`XZ_OVERHEAD` only. ``head`` that is not an xz stream
    header followed by a valid block header (magic, CRC32s, filter chain ending with LZMA2)
    raises ``ValueError``: the decoder itself would refuse it.
    """
    if len(head) < _XZ_STREAM_HEADER + 1:
        if not XZ_MAGIC.startswith(head[: len(XZ_MAGIC)]):
            raise ValueError("not an xz stream header")
        return None
    if head[:6] != XZ_MAGIC:
        raise ValueError("not an xz stream header")
    flags = head[6:8]
    if flags[0] or flags[1] & 0xF0 or zlib.crc32(flags) != int.from_bytes(head[8:12], "little"):
        raise ValueError("the xz stream header is damaged")
    size_byte = head[_XZ_STREAM_HEADER]
    if size_byte == 0:  # the index: a stream without blocks
        return XZ_OVERHEAD
    end = _XZ_STREAM_HEADER + (size_byte + 1) * 4
    if len(head) < end:
        return None
    block = head[_XZ_STREAM_HEADER : end - 4]
    if zlib.crc32(block) != int.from_bytes(head[end - 4 : end], "little"):
        raise ValueError("the first block header's CRC32 does not match")
    block_flags = block[1]
    if block_flags & 0x3C:
        raise ValueError("reserved block flags are set")
    pos = 2
    if block_flags & 0x40:
        _, pos = _xz_varint(block, pos)  # compressed size
    if block_flags & 0x80:
        _, pos = _xz_varint(block, pos)  # uncompressed size
    need = None
    for index in range((block_flags & 3) + 1):
        filter_id, pos = _xz_varint(block, pos)
        size, pos = _xz_varint(block, pos)
        props = block[pos : pos + size]
        if len(props) < size:
            raise ValueError("the block header ends inside a filter's properties")
        pos += size
        if filter_id == _LZMA2_FILTER:
            if size != 1 or index != block_flags & 3:
                raise ValueError("the LZMA2 filter is not the last one, or malformed")
            need = lzma2_dict_size(props[0]) + XZ_OVERHEAD
    if need is None:
        raise ValueError("the first block's filter chain does not end with LZMA2")
    return need


class _StdlibDecoder(Protocol):
    """What lzma.LZMADecompressor and bz2.BZ2Decompressor have in common."""

    @property
    def eof(self) -> bool: ...

    @property
    def needs_input(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes, max_length: int = ..., /) -> bytes: ...


class _ZlibDecoder:
    """A gzip member or zlib stream with the interface of the lzma and bz2 decoders."""

    def __init__(self, wbits: int) -> None:
        self._decoder = zlib.decompressobj(wbits)

    @property
    def eof(self) -> bool:
        return self._decoder.eof

    @property
    def needs_input(self) -> bool:
        return not self._decoder.unconsumed_tail

    @property
    def unused_data(self) -> bytes:
        return self._decoder.unused_data

    def decompress(self, data: bytes, max_length: int = 0, /) -> bytes:
        try:
            return self._decoder.decompress(self._decoder.unconsumed_tail + data, max_length)
        except zlib.error as exc:
            raise ValueError(str(exc)) from None


class _BrotliDecoder:
    """A brotli stream (RFC 7932) with the interface of the lzma and bz2 decoders; data after
    the end of the stream is an error, as brotli streams do not concatenate.

    The decoder may hold output back even when it accepts input, so it is asked again (with no
    input) until a call gives nothing.
    """

    def __init__(self) -> None:
        self._decoder = brotli.Decompressor()
        self._gave = False

    @property
    def eof(self) -> bool:
        return bool(self._decoder.is_finished())

    @property
    def needs_input(self) -> bool:
        return not self._gave and bool(self._decoder.can_accept_more_data())

    @property
    def unused_data(self) -> bytes:
        return b""

    def decompress(self, data: bytes, max_length: int = 0, /) -> bytes:
        if data and not self._decoder.can_accept_more_data():
            raise ValueError("input given while output is pending")
        try:
            out = bytes(self._decoder.process(data, output_buffer_limit=max_length))
        except brotli.error as exc:
            raise ValueError(str(exc)) from None
        self._gave = bool(out)
        return out


class _SinkWriter:
    """The file-like object zstandard's stream_writer writes decompressed pieces to."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    def write(self, data: bytes) -> int:
        self._sink(bytes(data))
        return len(data)


_ZSTD_MAGIC: Final = 0xFD2FB528
_SKIPPABLE_MASK: Final = 0xFFFFFFF0
_SKIPPABLE_MAGIC: Final = 0x184D2A50
_Z_MAGIC, _Z_DESCRIPTOR, _Z_HEADER, _Z_BLOCK, _Z_CHECKSUM, _Z_SKIPPABLE_SIZE = range(6)


def zstd_window_size(descriptor: int, header: bytes) -> int:
    """The window a zstd frame needs (RFC 8878, 3.1.1.1), from its Frame_Header_Descriptor and
    the header fields after it: the Window_Descriptor's size, or for a single-segment frame its
    Frame_Content_Size."""
    dictionary_id_size = (0, 1, 2, 4)[descriptor & 3]
    if not descriptor & 0x20:
        exponent, mantissa = header[0] >> 3, header[0] & 7
        base = 1 << (10 + exponent)
        return base + (base >> 3) * mantissa
    start = dictionary_id_size
    size_field = (1, 2, 4, 8)[descriptor >> 6]
    content_size = int.from_bytes(header[start : start + size_field], "little")
    return content_size + 256 if size_field == 2 else content_size


class _ZstdFrames:
    """Follows the frame structure of a zstd stream (RFC 8878, section 3.1) without decoding.

    zstandard's streaming decoder cannot tell whether its input stopped at a frame boundary; this
    tracker can, by reading frame headers and block headers and counting block contents. A frame
    whose window exceeds ``max_window`` (when given), or :data:`ZSTD_MAX_WINDOW`, is a
    :class:`FormatError`. With an ``allowance``, :meth:`feed` stops right after the header of a
    frame whose decoder needs more (:func:`zstd_frame_need`), and ``wants`` says how much.
    """

    def __init__(self, max_window: int | None = None) -> None:
        self.frames = 0
        self.allowance: int | None = None
        self.wants = 0
        #: Where the frame being read began (bytes from the start of the stream).
        self.frame_start = 0
        #: Bytes fed so far.
        self.offset = 0
        self._max_window = max_window
        self._descriptor = 0
        self._state = _Z_MAGIC
        self._need = 4
        self._buf = bytearray()
        self._skip = 0
        self._checksum = False
        self._last = False

    @property
    def at_boundary(self) -> bool:
        return self._state == _Z_MAGIC and not self._buf and not self._skip

    def feed(self, data: memoryview) -> int:
        """Follow ``data``; returns how many of its bytes were read (all of them unless a frame
        header asked for more than the allowance: then ``wants`` is set)."""
        pos = 0
        end = len(data)
        while pos < end and not self.wants:
            if self._skip:
                take = min(self._skip, end - pos)
                pos += take
                self._skip -= take
                if not self._skip:
                    self._after_skip()
                continue
            take = min(self._need - len(self._buf), end - pos)
            self._buf += data[pos : pos + take]
            pos += take
            if len(self._buf) == self._need:
                piece = bytes(self._buf)
                self._buf.clear()
                self._field(piece, self.offset + pos - len(piece))
        self.offset += pos
        return pos

    def _expect(self, state: int, need: int) -> None:
        self._state = state
        self._need = need

    def _field(self, piece: bytes, offset: int) -> None:
        value = int.from_bytes(piece, "little")
        state = self._state
        if state == _Z_MAGIC:
            if value == _ZSTD_MAGIC:
                self.frame_start = offset
                self._expect(_Z_DESCRIPTOR, 1)
            elif value & _SKIPPABLE_MASK == _SKIPPABLE_MAGIC:
                self._expect(_Z_SKIPPABLE_SIZE, 4)
            else:
                what = "data after the last frame" if self.frames else "input"
                raise FormatError(f"zstd: {what} at byte {offset} is not a zstd frame")
        elif state == _Z_DESCRIPTOR:
            if value & 0x08:
                raise FormatError(f"zstd: reserved bit set in frame header at byte {offset}")
            single_segment = bool(value & 0x20)
            self._checksum = bool(value & 0x04)
            self._descriptor = value
            rest = (0 if single_segment else 1) + (0, 1, 2, 4)[value & 3]
            rest += ((1 if single_segment else 0), 2, 4, 8)[value >> 6]
            self._expect(_Z_HEADER, rest)  # never empty: a window or a content size
        elif state == _Z_HEADER:
            window = zstd_window_size(self._descriptor, piece)
            if self._max_window is not None and window > self._max_window:
                frame, start = self.frames + 1, self.frame_start
                raise FormatError(
                    f"zstd: frame {frame} (at byte {start}) needs a window of {window} bytes, "
                    f"more than the {self._max_window} allowed for this stream"
                )
            if window > ZSTD_MAX_WINDOW:  # what the decoder would say once it saw the header
                frame, start = self.frames + 1, self.frame_start
                raise FormatError(
                    f"zstd: corrupt input: frame {frame} (at byte {start}) needs a window of "
                    f"{window} bytes, more than the {ZSTD_MAX_WINDOW} allowed"
                )
            need = zstd_frame_need(window)
            if self.allowance is not None and need > self.allowance:
                self.wants = need
            self._expect(_Z_BLOCK, 3)
        elif state == _Z_BLOCK:
            block_type = (value >> 1) & 3
            if block_type == 3:
                raise FormatError(f"zstd: reserved block type at byte {offset}")
            self._last = bool(value & 1)
            self._skip = 1 if block_type == 1 else value >> 3
            if not self._skip:
                self._after_skip()
        elif state == _Z_CHECKSUM:
            self._frame_done()
        else:  # _Z_SKIPPABLE_SIZE
            self._state = _Z_SKIPPABLE_SIZE
            self._skip = value
            if not self._skip:
                self._after_skip()

    def _after_skip(self) -> None:
        if self._state == _Z_SKIPPABLE_SIZE:
            self._frame_done()
        elif not self._last:
            self._expect(_Z_BLOCK, 3)
        elif self._checksum:
            self._expect(_Z_CHECKSUM, 4)
        else:
            self._frame_done()

    def _frame_done(self) -> None:
        self.frames += 1
        self._expect(_Z_MAGIC, 4)


def _closed_sink(data: bytes) -> None:
    raise ValueError("write after the decompressor was closed")


class Decompressor:
    """Push decoder: ``write`` compressed chunks, get pieces of at most ``chunk_size`` bytes.

    ``max_window`` (zstd only) refuses, as a :class:`FormatError`, any frame whose window is
    larger, before its first block is decoded; without it the limit is :data:`ZSTD_MAX_WINDOW`.

    ``allowance`` (bytes; ``None``: no accounting) makes the decoder pause before it makes a
    decoder that needs more memory than that for the next stream or frame: ``write`` then
    keeps the rest of its input and returns with ``wants`` set to the memory needed, and
    :meth:`resume` with a larger allowance goes on. An xz stream's decoder is then limited to
    what its first block header asked for (a later block wanting more is a
    :class:`FormatError`).
    """

    def __init__(
        self,
        compression: str,
        sink: Sink,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        max_window: int | None = None,
        allowance: int | None = None,
    ) -> None:
        check_compression(compression, decoding=True)
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self.compression = compression
        self._sink = sink
        self._chunk = chunk_size
        self._error: FormatError | None = None
        self._finished = False
        self._allowance = allowance
        #: The memory the decoder waits for (0: it is not paused).
        self.wants = 0
        # Paused: zstd, the bytes read by the frame tracker but not given to the decoder, and
        # those not read yet; the others, the input that starts the next stream.
        self._held: tuple[bytes, bytes] | None = None
        # xz with an allowance: the start of the next stream, until its headers are complete.
        self._head = b""
        # xz / bzip2: the decoder of the current stream, None between streams.
        self._decoder: _StdlibDecoder | None = None
        self._streams = 0
        self._zstd: zstandard.ZstdDecompressionWriter | None = None
        if compression == "zstd":
            self._frames = _ZstdFrames(max_window)
            self._frames.allowance = allowance
            self._zstd = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).stream_writer(
                cast("IO[bytes]", _SinkWriter(sink)), write_size=chunk_size, closefd=False
            )

    def write(self, data: Buffer) -> None:
        """Decompress the next chunk of input, calling the sink with the output."""
        if self._error is not None:
            raise self._error
        if self._finished:
            raise ValueError("write() after finish()")
        if self.wants:
            raise ValueError("write() while the decoder waits for memory: resume() first")
        self._guarded(self._write, data)

    def resume(self, allowance: int) -> None:
        """Allow the decoder ``allowance`` bytes of memory and go on decoding the input it
        held; it stays paused (``wants`` unchanged) while that is less than it wants."""
        if self._error is not None:
            raise self._error
        self._allowance = max(allowance, self._allowance or 0)
        if self.compression == "zstd":
            self._frames.allowance = self._allowance
        if not self.wants or self.wants > self._allowance:
            return
        self.wants = 0
        held, self._held = self._held, None
        assert held is not None
        self._guarded(self._resume, held)

    def _resume(self, held: tuple[bytes, bytes]) -> None:
        if self.compression == "zstd":
            read, unread = held
            self._frames.wants = 0
            self._zstd_decode(memoryview(read))
            self._write_zstd(memoryview(unread))
        else:
            self._write_stdlib(held[1], admitted=True)

    def _guarded(self, step: Callable[[_T], None], data: _T) -> None:
        try:
            step(data)
        except FormatError as exc:
            self._error = exc
            raise
        except BaseException as exc:  # from the sink: the decoder's state is now undefined
            self._error = FormatError(f"{self.compression}: an earlier write failed: {exc!r}")
            raise

    def finish(self) -> None:
        """End of input: raise :class:`FormatError` if it stopped inside a stream or was empty."""
        if self._error is not None:
            raise self._error
        if self._finished:
            return
        if self.wants:
            raise ValueError("finish() while the decoder waits for memory: resume() first")
        problem = None
        if self.compression == "zstd":
            if not self._frames.at_boundary:
                problem = "zstd: input is truncated (it ends inside a frame)"
            elif not self._frames.frames:
                problem = "zstd: input is empty"
        elif self.compression != "none":
            if self._head and self._streams:
                problem = f"{self.compression}: data after stream {self._streams} is not a stream"
            elif self._head:
                problem = f"{self.compression}: input is truncated (it ends inside a stream)"
            elif self._decoder is not None and self._streams:
                problem = f"{self.compression}: data after stream {self._streams} is not a stream"
            elif self._decoder is not None:
                problem = f"{self.compression}: input is truncated (it ends inside a stream)"
            elif not self._streams:
                problem = f"{self.compression}: input is empty"
        if problem is not None:
            self._error = FormatError(problem)
            self.close()
            raise self._error
        self._finished = True
        self.close()

    def close(self) -> None:
        """Release the decoder and the sink (idempotent; no more writes afterwards).

        The zstd stream writer is a C object the garbage collector cannot see into: when the
        sink is a bound method of the decompressor's owner, the owner, this decompressor and the
        writer form a cycle no collection frees, and each upload would keep its decoder window
        (up to 128 MiB) and whatever the owner holds. Closing breaks the cycle.
        """
        self._zstd = None
        self._decoder = None
        self._held = None
        self._head = b""
        self._sink = _closed_sink
        if self._error is None and not self._finished:
            self._error = FormatError(f"{self.compression}: the decoder was closed")

    def _write(self, data: Buffer) -> None:
        compression = self.compression
        if compression == "none":
            self._pass_through(data)
        elif compression == "zstd":
            self._write_zstd(memoryview(data).cast("B"))
        else:
            self._write_stdlib(bytes(data))

    def _write_zstd(self, view: memoryview) -> None:
        frames = self._frames
        start = frames.offset
        read = frames.feed(view)
        if frames.wants:
            # The decoder gets nothing of the frame that waits: zstd makes its window once it
            # has the whole frame header (a part of it given earlier is harmless).
            split = max(0, min(read, frames.frame_start - start))
            self._zstd_decode(view[:split])
            self._held = bytes(view[split:read]), bytes(view[read:])
            self.wants = frames.wants
            return
        self._zstd_decode(view)

    def _zstd_decode(self, view: memoryview) -> None:
        if not view:
            return
        if self._zstd is None:
            raise FormatError("zstd: the decoder was closed")
        try:
            self._zstd.write(view)
        except zstandard.ZstdError as exc:
            raise FormatError(f"zstd: corrupt input: {exc}") from None

    def _pass_through(self, data: Buffer) -> None:
        if isinstance(data, bytes) and len(data) <= self._chunk:
            if data:
                self._sink(data)
            return
        view = memoryview(data).cast("B")
        for start in range(0, len(view), self._chunk):
            self._sink(view[start : start + self._chunk].tobytes())

    def _new_decoder(self, need: int | None) -> _StdlibDecoder:
        if self.compression == "xz":
            memlimit = XZ_MEMLIMIT if need is None else need
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=memlimit)
        if self.compression == "gzip":
            return _ZlibDecoder(16 + zlib.MAX_WBITS)
        if self.compression == "deflate":
            return _ZlibDecoder(zlib.MAX_WBITS)
        if self.compression == "br":
            return _BrotliDecoder()
        return bz2.BZ2Decompressor()

    def _next_need(self, pending: bytes) -> tuple[int | None, bytes]:
        """With an allowance: the memory the stream that ``pending`` starts needs, and its
        input (xz: ``None`` while its headers are not all there; they wait in ``_head``)."""
        need = decoder_need(self.compression)
        if need is not None:
            return need, pending
        head = self._head + pending
        try:
            need = xz_stream_need(head)
        except ValueError:
            need = XZ_OVERHEAD  # not a stream the decoder takes: let it say what is wrong
        if need is None:
            self._head = head
            return None, b""
        self._head = b""
        if need > XZ_MEMLIMIT:
            where = f"stream {self._streams + 1}" if self._streams else "input"
            raise FormatError(
                f"xz: corrupt {where}: it needs {need} bytes of memory to decode, more than "
                f"the {XZ_MEMLIMIT} allowed"
            )
        return need, head

    def _write_stdlib(self, data: bytes, admitted: bool = False) -> None:
        pending = data
        while True:
            decoder = self._decoder
            if decoder is None:
                if not pending:
                    return
                need = None
                if self._allowance is not None:
                    need, pending = self._next_need(pending)
                    if need is None:
                        return
                    if need > self._allowance and not admitted:
                        self._held = (b"", pending)
                        self.wants = need
                        return
                admitted = False
                decoder = self._decoder = self._new_decoder(need)
            try:
                out = decoder.decompress(pending, self._chunk)
            except (lzma.LZMAError, OSError, EOFError, ValueError) as exc:
                where = f"stream {self._streams + 1}" if self._streams else "input"
                after = " (trailing data after the last stream?)" if self._streams else ""
                raise FormatError(f"{self.compression}: corrupt {where}{after}: {exc}") from None
            pending = b""
            if out:
                self._pass_through(out)  # brotli may give a little more than asked
            if decoder.eof:
                self._streams += 1
                self._decoder = None
                pending = decoder.unused_data
            elif decoder.needs_input:
                return


class Compressor:
    """Push encoder with the same shape: ``write`` chunks, ``finish``, output goes to ``sink``.

    ``level`` is the codec's own scale (zstd 1..22, default 3; xz presets 0..9, default 6;
    bzip2 1..9, default 9; gzip 1..9, default 6; brotli 0..11, default 11). zstd frames carry a
    content checksum, xz streams a CRC64 (the default), bzip2 and gzip their CRCs, so corruption
    is detected when decompressing. ``none`` passes data through.
    """

    def __init__(self, compression: str, sink: Sink, level: int | None = None) -> None:
        check_compression(compression)
        self.compression = compression
        self._sink = sink
        self._zstd: zstandard.ZstdCompressionObj | None = None
        self._stdlib: lzma.LZMACompressor | bz2.BZ2Compressor | zlib._Compress | None = None
        self._brotli: brotli.Compressor | None = None
        if compression == "zstd":
            self._zstd = zstandard.ZstdCompressor(
                level=3 if level is None else level, write_checksum=True
            ).compressobj()
        elif compression == "xz":
            self._stdlib = lzma.LZMACompressor(
                format=lzma.FORMAT_XZ, preset=6 if level is None else level
            )
        elif compression == "bzip2":
            self._stdlib = bz2.BZ2Compressor(9 if level is None else level)
        elif compression == "gzip":
            self._stdlib = zlib.compressobj(
                6 if level is None else level, wbits=16 + zlib.MAX_WBITS
            )
        elif compression == "br":
            self._brotli = brotli.Compressor(quality=11 if level is None else level)

    def write(self, data: Buffer) -> None:
        if self._zstd is not None:
            out = self._zstd.compress(memoryview(data).cast("B"))
        elif self._stdlib is not None:
            out = self._stdlib.compress(data)
        elif self._brotli is not None:
            out = self._brotli.process(bytes(data))
        else:
            out = bytes(data)
        if out:
            self._sink(out)

    def finish(self) -> None:
        if self._zstd is not None:
            out = self._zstd.flush()
        elif self._stdlib is not None:
            out = self._stdlib.flush()
        elif self._brotli is not None:
            out = self._brotli.finish()
        else:
            out = b""
        if out:
            self._sink(out)
