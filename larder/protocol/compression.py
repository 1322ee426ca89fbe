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
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Final, Protocol, cast

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

_BY_EXTENSION: Final = {ext: name for name, ext in COMPRESSIONS.items()}

Sink = Callable[[bytes], None]


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
    whose window exceeds ``max_window`` (when given) is a :class:`FormatError`.
    """

    def __init__(self, max_window: int | None = None) -> None:
        self.frames = 0
        self._max_window = max_window
        self._descriptor = 0
        self._frame_start = 0
        self._state = _Z_MAGIC
        self._need = 4
        self._buf = bytearray()
        self._skip = 0
        self._checksum = False
        self._last = False
        self._offset = 0

    @property
    def at_boundary(self) -> bool:
        return self._state == _Z_MAGIC and not self._buf and not self._skip

    def feed(self, data: memoryview) -> None:
        pos = 0
        end = len(data)
        while pos < end:
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
                self._field(piece, self._offset + pos - len(piece))
        self._offset += end

    def _expect(self, state: int, need: int) -> None:
        self._state = state
        self._need = need

    def _field(self, piece: bytes, offset: int) -> None:
        value = int.from_bytes(piece, "little")
        state = self._state
        if state == _Z_MAGIC:
            if value == _ZSTD_MAGIC:
                self._frame_start = offset
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
                frame, start = self.frames + 1, self._frame_start
                raise FormatError(
                    f"zstd: frame {frame} (at byte {start}) needs a window of {window} bytes, "
                    f"more than the {self._max_window} allowed for this stream"
                )
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
    """

    def __init__(
        self,
        compression: str,
        sink: Sink,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        max_window: int | None = None,
    ) -> None:
        check_compression(compression, decoding=True)
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self.compression = compression
        self._sink = sink
        self._chunk = chunk_size
        self._error: FormatError | None = None
        self._finished = False
        # xz / bzip2: the decoder of the current stream, None between streams.
        self._decoder: _StdlibDecoder | None = None
        self._streams = 0
        self._zstd: zstandard.ZstdDecompressionWriter | None = None
        if compression == "zstd":
            self._frames = _ZstdFrames(max_window)
            self._zstd = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).stream_writer(
                cast("IO[bytes]", _SinkWriter(sink)), write_size=chunk_size, closefd=False
            )

    def write(self, data: Buffer) -> None:
        """Decompress the next chunk of input, calling the sink with the output."""
        if self._error is not None:
            raise self._error
        if self._finished:
            raise ValueError("write() after finish()")
        try:
            self._write(data)
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
        problem = None
        if self.compression == "zstd":
            if not self._frames.at_boundary:
                problem = "zstd: input is truncated (it ends inside a frame)"
            elif not self._frames.frames:
                problem = "zstd: input is empty"
        elif self.compression != "none":
            if self._decoder is not None and self._streams:
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
        self._sink = _closed_sink
        if self._error is None and not self._finished:
            self._error = FormatError(f"{self.compression}: the decoder was closed")

    def _write(self, data: Buffer) -> None:
        compression = self.compression
        if compression == "none":
            self._pass_through(data)
        elif compression == "zstd":
            view = memoryview(data).cast("B")
            self._frames.feed(view)
            if self._zstd is None:
                raise FormatError("zstd: the decoder was closed")
            try:
                self._zstd.write(view)
            except zstandard.ZstdError as exc:
                raise FormatError(f"zstd: corrupt input: {exc}") from None
        else:
            self._write_stdlib(bytes(data))

    def _pass_through(self, data: Buffer) -> None:
        if isinstance(data, bytes) and len(data) <= self._chunk:
            if data:
                self._sink(data)
            return
        view = memoryview(data).cast("B")
        for start in range(0, len(view), self._chunk):
            self._sink(view[start : start + self._chunk].tobytes())

    def _new_decoder(self) -> _StdlibDecoder:
        if self.compression == "xz":
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=XZ_MEMLIMIT)
        if self.compression == "gzip":
            return _ZlibDecoder(16 + zlib.MAX_WBITS)
        if self.compression == "deflate":
            return _ZlibDecoder(zlib.MAX_WBITS)
        if self.compression == "br":
            return _BrotliDecoder()
        return bz2.BZ2Decompressor()

    def _write_stdlib(self, data: bytes) -> None:
        pending = data
        while True:
            decoder = self._decoder
            if decoder is None:
                if not pending:
                    return
                decoder = self._decoder = self._new_decoder()
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
