"""The NAR (Nix ARchive) format: a streaming validator and two writers.

Spec: Nix ``src/libutil/archive.cc`` (``dumpPath``, ``parseDump``) and Eelco Dolstra's thesis,
section 5.2.1. A NAR is a sequence of *strings*; ``str(s)`` is the length of ``s`` as a 64-bit
little-endian integer, the bytes of ``s``, then zero bytes up to a multiple of 8::

    nar       = str("nix-archive-1") node
    node      = str("(") str("type") body str(")")
    body      = str("regular") [str("executable") str("")] str("contents") str(<file data>)
              | str("symlink") str("target") str(<target>)
              | str("directory") entry*
    entry     = str("entry") str("(") str("name") str(<name>) str("node") node str(")")

A NAR is canonical: there is exactly one NAR per file system tree, which is what makes its sha256
(the narinfo's ``NarHash``) a content address. :class:`NarValidator` therefore accepts only the
canonical form ``nix-store --dump`` writes and rejects, with the byte offset and the path inside
the archive:

* a wrong magic, a string whose padding is not zero, anything the grammar does not allow
  (including ``executable`` after ``contents``, which Nix's own lenient parser tolerates);
* entry names that are empty, ``.`` or ``..``, or contain ``/`` or NUL, or that are not in
  strictly increasing bytewise order (which also rules out duplicates);
* symlink targets that are empty or contain NUL;
* names longer than :data:`MAX_NAME_LENGTH` bytes (1024: every file system limits a name to 255
  bytes, or 255 UTF-16 units on macOS), targets longer than :data:`MAX_TARGET_LENGTH` bytes
  (4095: Linux's ``PATH_MAX`` counts the terminating NUL, so no system stores a longer one),
  directories nested deeper than :data:`MAX_DEPTH` (256);
* truncation, and any byte after the root node.

Only keywords, names and targets are ever buffered, so the validator's memory is bounded by those
limits whatever the NAR's size; file data is skipped by counting, never copied.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Final

from larder.errors import FormatError

if TYPE_CHECKING:
    from typing_extensions import Buffer

NAR_MAGIC: Final = b"nix-archive-1"
MAX_NAME_LENGTH: Final = 1024
MAX_TARGET_LENGTH: Final = 4095
MAX_DEPTH: Final = 256
MAX_CONTENTS_LENGTH: Final = (1 << 63) - 1
DUMP_CHUNK_SIZE: Final = 256 * 1024

_ZEROS = bytes(8)
_U64 = struct.Struct("<Q")


def nar_string(data: bytes) -> bytes:
    """``str(data)``: the 8-byte little-endian length, the bytes, zero padding to 8."""
    return len(data).to_bytes(8, "little") + data + _ZEROS[: -len(data) & 7]


def _show(data: bytes) -> str:
    return repr(data) if len(data) <= 64 else repr(data[:61] + b"...")


def check_entry_name(name: bytes) -> bytes:
    """Return ``name`` if it may name a directory entry in a NAR, else raise FormatError."""
    if not name:
        raise FormatError("entry name is empty")
    if name in (b".", b".."):
        raise FormatError(f"entry name {_show(name)} is not allowed")
    if b"/" in name or b"\0" in name:
        raise FormatError(f"entry name {_show(name)} contains '/' or NUL")
    if len(name) > MAX_NAME_LENGTH:
        raise FormatError(f"entry name is {len(name)} bytes, more than {MAX_NAME_LENGTH}")
    return name


def _check_target(target: bytes) -> bytes:
    if not target:
        raise FormatError("symlink target is empty")
    if b"\0" in target:
        raise FormatError(f"symlink target {_show(target)} contains NUL")
    if len(target) > MAX_TARGET_LENGTH:
        raise FormatError(f"symlink target is {len(target)} bytes, more than {MAX_TARGET_LENGTH}")
    return target


# -- validator ------------------------------------------------------------------------------


# Grammar states (what the next string must be).
(
    _S_MAGIC,
    _S_OPEN,
    _S_TYPE,
    _S_TYPE_VALUE,
    _S_EXEC_OR_CONTENTS,
    _S_EXEC_EMPTY,
    _S_CONTENTS_KW,
    _S_DATA,
    _S_TARGET_KW,
    _S_TARGET,
    _S_CLOSE,
    _S_ENTRY_OR_CLOSE,
    _S_ENTRY_OPEN,
    _S_NAME_KW,
    _S_NAME,
    _S_NODE_KW,
    _S_ENTRY_CLOSE,
    _S_END,
) = range(18)


def _words(*words: bytes) -> str:
    return " or ".join(repr(w.decode()) for w in words)


# state -> (longest acceptable token, description of what is expected)
_EXPECT: Final[dict[int, tuple[int, str]]] = {
    _S_MAGIC: (len(NAR_MAGIC), _words(NAR_MAGIC)),
    _S_OPEN: (1, _words(b"(")),
    _S_TYPE: (4, _words(b"type")),
    _S_TYPE_VALUE: (9, _words(b"regular", b"symlink", b"directory")),
    _S_EXEC_OR_CONTENTS: (10, _words(b"executable", b"contents")),
    _S_EXEC_EMPTY: (0, _words(b"")),
    _S_CONTENTS_KW: (8, _words(b"contents")),
    _S_DATA: (MAX_CONTENTS_LENGTH, "file contents"),
    _S_TARGET_KW: (6, _words(b"target")),
    _S_TARGET: (MAX_TARGET_LENGTH, "a symlink target"),
    _S_CLOSE: (1, _words(b")")),
    _S_ENTRY_OR_CLOSE: (5, _words(b"entry", b")")),
    _S_ENTRY_OPEN: (1, _words(b"(")),
    _S_NAME_KW: (4, _words(b"name")),
    _S_NAME: (MAX_NAME_LENGTH, "an entry name"),
    _S_NODE_KW: (4, _words(b"node")),
    _S_ENTRY_CLOSE: (1, _words(b")")),
    _S_END: (-1, "the end of the NAR"),
}
_LIMIT: Final = [_EXPECT[state][0] for state in range(len(_EXPECT))]
# Transitions without side effects: state -> {token: next state}. Tokens not listed go to
# NarValidator._token, which handles the rest of the grammar and raises for anything else.
_NEXT: Final[list[dict[bytes, int]]] = [{} for _ in range(len(_EXPECT))]
_NEXT[_S_OPEN] = {b"(": _S_TYPE}
_NEXT[_S_TYPE] = {b"type": _S_TYPE_VALUE}
_NEXT[_S_TYPE_VALUE] = {b"regular": _S_EXEC_OR_CONTENTS, b"symlink": _S_TARGET_KW}
_NEXT[_S_EXEC_OR_CONTENTS] = {b"executable": _S_EXEC_EMPTY, b"contents": _S_DATA}
_NEXT[_S_EXEC_EMPTY] = {b"": _S_CONTENTS_KW}
_NEXT[_S_CONTENTS_KW] = {b"contents": _S_DATA}
_NEXT[_S_TARGET_KW] = {b"target": _S_TARGET}
_NEXT[_S_ENTRY_OR_CLOSE] = {b"entry": _S_ENTRY_OPEN}
_NEXT[_S_ENTRY_OPEN] = {b"(": _S_NAME_KW}
_NEXT[_S_NAME_KW] = {b"name": _S_NAME}
_NEXT[_S_ENTRY_CLOSE] = {b")": _S_ENTRY_OR_CLOSE}

# Byte-level phases of reading one string.
_LEN, _BODY, _PAD, _SKIP, _DONE = range(5)


class NarValidator:
    """Incremental, bounded-memory validator of a NAR stream (see the module docstring).

    Feed the stream in chunks of any size with :meth:`feed`, then call :meth:`finish`. Both raise
    :class:`FormatError` at the first problem; after that every call raises the same error.
    """

    def __init__(self) -> None:
        self._size = 0
        self._phase = _LEN
        self._need = 8
        self._pad = 0
        self._buf = bytearray()
        self._pending = b""  # the current string's bytes (b"" for file contents)
        self._offset = 0  # stream offset where the current string starts
        self._state = _S_MAGIC
        # One frame per open directory: [its path, the previous entry name or None].
        self._dirs: list[list[bytes | None]] = []
        self._path = b"/"  # path of the node being parsed, for messages
        self._error: FormatError | None = None

    @property
    def size(self) -> int:
        """The number of bytes fed so far."""
        return self._size

    @property
    def done(self) -> bool:
        """Whether the root node is complete (more bytes would be an error)."""
        return self._phase == _DONE

    def feed(self, data: Buffer) -> None:
        """Validate the next chunk of the stream."""
        if self._error is not None:
            raise self._error
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        base = self._size
        self._size += len(view)
        try:
            self._feed(view, base, data if type(data) is bytes else None)
        except FormatError as exc:
            self._error = exc
            raise

    def finish(self) -> None:
        """Declare the end of the stream; raise :class:`FormatError` if the NAR is incomplete."""
        if self._error is not None:
            raise self._error
        if self._phase != _DONE:
            if self._size == 0:
                self._error = FormatError("NAR is empty")
            elif self._phase == _SKIP:
                self._error = self._fail(
                    f"NAR is truncated: {self._need} bytes of file contents missing",
                    self._offset,
                )
            else:
                what = _EXPECT[self._state][1]
                self._error = self._fail(f"NAR is truncated: expected {what}", self._size)
            raise self._error

    # The byte level. Each string goes through _LEN (8 bytes), then _BODY (token bytes,
    # buffered) or _SKIP (file contents, only counted), then _PAD. Zero-length phases are
    # resolved at once, so a chunk boundary never leaves work pending. Whole small strings
    # inside one chunk take the fast path in _tokens.

    def _feed(self, view: memoryview, base: int, src: bytes | None) -> None:
        pos = 0
        end = len(view)
        while pos < end:
            phase = self._phase
            if phase == _SKIP:
                avail = end - pos
                if self._need > avail:
                    self._need -= avail
                    return
                pos += self._need
                self._need = 0
                self._end_body()
                continue
            if phase == _DONE:
                raise self._fail("unexpected data after the end of the NAR", base + pos)
            if phase == _LEN and not self._buf and end - pos >= 16:
                if src is None:  # slicing bytes is much cheaper than slicing a memoryview
                    src = view.tobytes()
                pos = self._tokens(src, pos, base)
                if pos >= end or self._phase != _LEN:
                    continue
            need = self._need
            if not self._buf and end - pos >= need:
                piece: bytes | memoryview = view[pos : pos + need]
                pos += need
            else:
                take = min(need, end - pos)
                self._buf += view[pos : pos + take]
                pos += take
                self._need -= take
                if self._need:
                    return
                piece = bytes(self._buf)
                self._buf.clear()
            if phase == _LEN:
                self._begin_string(int.from_bytes(piece, "little"), base + pos - 8)
            elif phase == _BODY:
                self._pending = bytes(piece)
                self._end_body()
            else:  # _PAD
                if piece != _ZEROS[: len(piece)]:
                    raise self._fail("non-zero padding after a string", base + pos - len(piece))
                self._end_string()

    def _tokens(self, src: bytes, pos: int, base: int) -> int:
        """Consume whole strings (small file contents included) at ``pos``; return the new pos."""
        end = len(src)
        transitions = _NEXT
        limits = _LIMIT
        unpack = _U64.unpack_from
        state = self._state
        while end - pos >= 8:
            length: int = unpack(src, pos)[0]
            padded = (length + 7) & ~7
            start = pos + 8
            if length > limits[state] or end - start < padded:
                break
            if length != padded and src[start + length : start + padded] != _ZEROS[length & 7 :]:
                self._state = state
                raise self._fail("non-zero padding after a string", base + start + length)
            token = src[start : start + length]
            following = transitions[state].get(token)
            if following is not None:
                state = following
            elif state == _S_DATA:
                state = _S_CLOSE
            else:
                self._state = state
                self._offset = base + pos
                self._token(token)
                state = self._state
                if state == _S_END:
                    self._phase = _DONE
                    self._need = 0
                    return start + padded
            pos = start + padded
        self._state = state
        return pos

    def _begin_string(self, length: int, offset: int) -> None:
        self._offset = offset
        if length > _LIMIT[self._state]:
            if self._state == _S_DATA:
                raise self._fail(f"file contents length {length} is too large", offset)
            what = _EXPECT[self._state][1]
            raise self._fail(f"expected {what}, got a string of {length} bytes", offset)
        self._pad = -length & 7
        self._need = length
        self._pending = b""
        if length:
            self._phase = _SKIP if self._state == _S_DATA else _BODY
        else:
            self._end_body()

    def _end_body(self) -> None:
        if self._pad:
            self._phase = _PAD
            self._need = self._pad
        else:
            self._end_string()

    def _end_string(self) -> None:
        self._token(self._pending)
        if self._state == _S_END:
            self._phase = _DONE
            self._need = 0
        else:
            self._phase = _LEN
            self._need = 8

    def _fail(self, message: str, offset: int) -> FormatError:
        path = self._path.decode("utf-8", "backslashreplace")
        return FormatError(f"invalid NAR at byte {offset} (in {path}): {message}")

    def _unexpected(self, token: bytes) -> None:
        what = _EXPECT[self._state][1]
        raise self._fail(f"expected {what}, got {_show(token)}", self._offset)

    # The grammar: one complete string, padding checked (file contents arrive as b"" once
    # counted), moves the state.

    def _token(self, token: bytes) -> None:
        state = self._state
        following = _NEXT[state].get(token)
        if following is not None:
            self._state = following
        elif state == _S_MAGIC:
            if token != NAR_MAGIC:
                raise self._fail(f"not a NAR: magic is {_show(token)}, not {_show(NAR_MAGIC)}", 0)
            self._state = _S_OPEN
        elif state == _S_TYPE_VALUE:
            if token == b"directory":
                if len(self._dirs) >= MAX_DEPTH:
                    raise self._fail(f"directories nested deeper than {MAX_DEPTH}", self._offset)
                self._dirs.append([self._path, None])
                self._state = _S_ENTRY_OR_CLOSE
            else:
                self._unexpected(token)
        elif state == _S_DATA:
            self._state = _S_CLOSE
        elif state == _S_CLOSE:
            if token != b")":
                self._unexpected(token)
            self._state = self._node_done()
        elif state == _S_TARGET:
            try:
                _check_target(token)
            except FormatError as exc:
                raise self._fail(exc.message, self._offset) from None
            self._state = _S_CLOSE
        elif state == _S_ENTRY_OR_CLOSE:
            if token == b")":
                self._dirs.pop()
                self._state = self._node_done()
            else:
                self._unexpected(token)
        elif state == _S_NAME:
            frame = self._dirs[-1]
            parent, previous = frame
            assert parent is not None
            try:
                check_entry_name(token)
            except FormatError as exc:
                raise self._fail(exc.message, self._offset) from None
            if previous is not None and token <= previous:
                problem = "duplicate entry" if token == previous else "entries not sorted:"
                raise self._fail(f"{problem} {_show(token)} after {_show(previous)}", self._offset)
            frame[1] = token
            self._state = _S_NODE_KW
        elif state == _S_NODE_KW:
            if token != b"node":
                self._unexpected(token)
            parent, name = self._dirs[-1]
            assert parent is not None and name is not None
            self._path = parent + name if parent.endswith(b"/") else parent + b"/" + name
            self._state = _S_OPEN
        else:  # a keyword state given another token
            self._unexpected(token)

    def _node_done(self) -> int:
        """The state after a node's closing ')': its entry's ')' or the end of the NAR."""
        if not self._dirs:
            return _S_END
        parent = self._dirs[-1][0]
        assert parent is not None
        self._path = parent
        return _S_ENTRY_CLOSE


# -- writers --------------------------------------------------------------------------------


def _name_bytes(name: object) -> bytes:
    if isinstance(name, str):
        return name.encode()
    if isinstance(name, bytes):
        return name
    raise TypeError(f"entry name must be str or bytes, not {type(name).__name__}")


def _write_node(out: bytearray, node: Mapping[str, object], depth: int) -> None:
    kind = node.get("type")
    out += nar_string(b"(") + nar_string(b"type")
    if kind == "regular":
        contents = node.get("contents", b"")
        if not isinstance(contents, bytes | bytearray | memoryview):
            raise TypeError("regular file contents must be bytes")
        out += nar_string(b"regular")
        if node.get("executable", False):
            out += nar_string(b"executable") + nar_string(b"")
        out += nar_string(b"contents") + nar_string(bytes(contents))
    elif kind == "symlink":
        out += nar_string(b"symlink") + nar_string(b"target")
        out += nar_string(_check_target(_name_bytes(node.get("target"))))
    elif kind == "directory":
        if depth >= MAX_DEPTH:
            raise FormatError(f"directories nested deeper than {MAX_DEPTH}")
        entries = node.get("entries", {})
        if not isinstance(entries, Mapping):
            raise TypeError("directory entries must be a mapping of name to node")
        named = sorted((_name_bytes(name), child) for name, child in entries.items())
        out += nar_string(b"directory")
        for index, (name, child) in enumerate(named):
            check_entry_name(name)
            if index and named[index - 1][0] == name:
                raise FormatError(f"duplicate entry name {_show(name)}")
            out += nar_string(b"entry") + nar_string(b"(") + nar_string(b"name")
            out += nar_string(name) + nar_string(b"node")
            _write_node(out, child, depth + 1)
            out += nar_string(b")")
    else:
        raise TypeError(f"unknown node type {kind!r} (expected regular, symlink or directory)")
    out += nar_string(b")")


def write_nar(node: Mapping[str, object]) -> bytes:
    """Serialise a tree described by nested mappings as a NAR (a helper for tests).

    A node is ``{"type": "regular", "contents": b"...", "executable": False}``,
    ``{"type": "symlink", "target": "..."}`` or ``{"type": "directory", "entries": {name: node}}``
    (names and targets as ``str`` or ``bytes``; entries are sorted here). To build an invalid NAR,
    concatenate :func:`nar_string` pieces by hand.
    """
    out = bytearray(nar_string(NAR_MAGIC))
    _write_node(out, node, 0)
    return bytes(out)


def dump_path(path: str | os.PathLike[str], chunk_size: int = DUMP_CHUNK_SIZE) -> Iterator[bytes]:
    """Serialise the file system tree at ``path`` as a NAR, like ``nix-store --dump``.

    Regular files whose owner-execute bit is set are ``executable``, symlinks are not followed,
    directory entries are sorted bytewise. Yields pieces of at most ``chunk_size`` bytes plus the
    few small strings of one node (so at most ``chunk_size + 8 KiB``), and never reads a whole
    file into memory. Raises :class:`OSError` when the tree cannot be read or
    a file shrinks while being read, and :class:`FormatError` for a file type a NAR cannot hold
    (device, socket, FIFO).
    """
    out = bytearray(nar_string(NAR_MAGIC))
    yield from _dump(os.fsencode(path), out, chunk_size)
    if out:
        yield bytes(out)


def _dump(path: bytes, out: bytearray, chunk_size: int) -> Iterator[bytes]:
    st = os.lstat(path)
    out += nar_string(b"(") + nar_string(b"type")
    if stat.S_ISREG(st.st_mode):
        out += nar_string(b"regular")
        if st.st_mode & stat.S_IXUSR:
            out += nar_string(b"executable") + nar_string(b"")
        out += nar_string(b"contents")
        yield from _dump_file(path, out, chunk_size)
    elif stat.S_ISLNK(st.st_mode):
        out += nar_string(b"symlink") + nar_string(b"target") + nar_string(os.readlink(path))
    elif stat.S_ISDIR(st.st_mode):
        out += nar_string(b"directory")
        for name in sorted(os.listdir(path)):
            if len(out) >= chunk_size:
                yield bytes(out)
                out.clear()
            out += nar_string(b"entry") + nar_string(b"(") + nar_string(b"name")
            out += nar_string(name) + nar_string(b"node")
            yield from _dump(os.path.join(path, name), out, chunk_size)
            out += nar_string(b")")
    else:
        shown = path.decode("utf-8", "backslashreplace")
        raise FormatError(f"{shown}: file type {stat.S_IFMT(st.st_mode):o} cannot be put in a NAR")
    out += nar_string(b")")
    if len(out) >= chunk_size:
        yield bytes(out)
        out.clear()


def _dump_file(path: bytes, out: bytearray, chunk_size: int) -> Iterator[bytes]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        out += size.to_bytes(8, "little")
        remaining = size
        while remaining:
            if len(out) >= chunk_size:
                yield bytes(out)
                out.clear()
            data = os.read(fd, min(remaining, chunk_size - len(out)))
            if not data:
                shown = path.decode("utf-8", "backslashreplace")
                raise OSError(f"{shown}: file shrank from {size} bytes while being read")
            remaining -= len(data)
            if out or len(data) < chunk_size:
                out += data
            else:
                yield data  # a whole chunk: hand it on without copying
    finally:
        os.close(fd)
    out += _ZEROS[: -size & 7]
