"""File digests remembered by file identity, so a build hashes an unchanged file once.

A build reads the same files again and again: a dependency's ``.rmeta``/``.rlib`` for every
crate that uses it (key item 7), the C library, start files and ``libgcc`` for every link (item
11), a build script's ``OUT_DIR`` for each of its package's crates. :func:`file_digest` keeps a
file's BLAKE3 under its *signature*: device, inode, size, and modification and change times in
nanoseconds. Writing a file changes its change time and replacing it changes its inode, so a
file with the same signature has the same content, with one exception the rule below closes.

The kernel stamps change times from a clock that advances in steps of a few milliseconds, so a
file written twice within one step could keep its signature (git calls such entries "racily
clean"). A digest is therefore remembered only when the file's change time lies at least
:data:`RACY_NS` before the hashing began (:data:`COARSE_RACY_NS` on a file system that keeps
whole seconds, such as FAT or ext3), and the signature read after hashing equals the one read
before (a file still being written is never remembered). An output rustc has just written is
hashed afresh; the crates that read it later find it remembered.

Each process remembers in memory and appends what it learns to ``digests`` in the state
directory (one line per file, ``O_APPEND``): the resident process reads the new lines before it
forks a child for the next call, a process compiling by itself reads them when it attaches, so
the calls of one build share what each of them hashed. The file is started afresh once it
passes :data:`MAX_LOG` bytes; a line that does not parse is skipped, and a log this user does not
own is not read. The state directory is the user's own (like ``toolchains.json``, which holds
digests too).
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from stat import S_ISREG

import blake3

from larder.client.atomic import replace_with

LOG_NAME = "digests"
#: A file whose change time is this close to the moment its hashing began is not remembered
#: (ten times the coarsest tick Linux stamps times with, 100 Hz).
RACY_NS = 100_000_000
#: The same for a change time in whole seconds: the file system may round it by up to two.
COARSE_RACY_NS = 3_000_000_000
#: Size past which the shared log is started afresh: about 8,000 files, a few builds' worth. A
#: process that does not fork from the resident one reads all of it (about 10 ms at that size).
MAX_LOG = 1024 * 1024
#: Entries kept in memory at most (a process that passes it forgets and starts over).
MAX_ENTRIES = 200_000

_HEX = b"0123456789abcdef"


def _signature(stat: os.stat_result) -> bytes:
    """Device, inode, size, modification and change times (ns), as a line of the log starts."""
    return b"%d %d %d %d %d" % (
        stat.st_dev,
        stat.st_ino,
        stat.st_size,
        stat.st_mtime_ns,
        stat.st_ctime_ns,
    )


def racy_window(changed_ns: int, racy_ns: int = RACY_NS) -> int:
    """How long before hashing a file must have last changed for its digest to be kept."""
    return racy_ns if changed_ns % 1_000_000_000 else max(racy_ns, COARSE_RACY_NS)


def hash_file(path: str | Path) -> str:
    """BLAKE3 hex of a file's content, read now."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    hasher.update_mmap(path)
    return hasher.hexdigest()


class Memo:
    """Digests by signature, shared with other processes through the log ``path`` (if any)."""

    def __init__(self, path: Path | None = None, racy_ns: int = RACY_NS) -> None:
        self.path = path
        self.racy_ns = racy_ns
        self.known: dict[bytes, bytes] = {}
        self._offset = 0
        self._log_id: tuple[int, int] | None = None

    def attach(self, path: Path) -> None:
        """Share digests through the log ``path`` from now on (what is known is kept)."""
        if self.path != path:
            self.path, self._offset, self._log_id = path, 0, None
        self.refresh()

    def refresh(self) -> None:
        """Take in the lines other processes appended since the last look."""
        if self.path is None:
            return
        try:
            with open(self.path, "rb") as log:
                stat = os.fstat(log.fileno())
                if stat.st_uid != os.getuid():
                    return  # not written by this user's calls: nothing in it is trusted
                if (stat.st_dev, stat.st_ino) != self._log_id or stat.st_size < self._offset:
                    self._log_id, self._offset = (stat.st_dev, stat.st_ino), 0  # a new log
                if stat.st_size > MAX_LOG:
                    self._restart()
                    return
                log.seek(self._offset)
                data = log.read(stat.st_size - self._offset)
        except OSError:
            return
        end = data.rfind(b"\n") + 1  # a line still being appended waits for the next look
        self._offset += end
        for line in data[:end].splitlines():
            signature, _, digest = line.rpartition(b" ")
            # A signature that is not one (garbage, a field short) can never match a file's.
            if len(digest) == 64 and not digest.strip(_HEX) and signature.count(b" ") == 4:
                self._store(signature, digest)

    def _store(self, signature: bytes, digest: bytes) -> None:
        if len(self.known) >= MAX_ENTRIES:
            self.known.clear()
        self.known[signature] = digest

    def _restart(self) -> None:
        assert self.path is not None
        try:
            replace_with(self.path, b"")
        except OSError:
            return
        self._log_id, self._offset = None, 0

    def digest(self, path: str | Path) -> str:
        """BLAKE3 hex of the regular file at ``path`` (anything else is an :class:`OSError`),
        remembered or hashed now."""
        began = time.time_ns()
        stat = os.stat(path)
        if not S_ISREG(stat.st_mode):  # a FIFO or a device would be read until killed
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        before = _signature(stat)
        known = self.known.get(before)
        if known is not None:
            return known.decode("ascii")
        digest = hash_file(path)
        changed = stat.st_ctime_ns
        if changed <= began - racy_window(changed, self.racy_ns) and (
            _signature(os.stat(path)) == before
        ):
            self._store(before, digest.encode("ascii"))
            self._append(before + b" " + digest.encode("ascii") + b"\n")
        return digest

    def _append(self, line: bytes) -> None:
        if self.path is None:
            return
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return
        try:
            os.write(fd, line)  # one write: appended whole
        except OSError:
            pass
        finally:
            os.close(fd)


_memo = Memo()


def attach(state_dir: Path) -> None:
    """Share digests through ``state_dir``'s log (what this process knows is kept)."""
    _memo.attach(Path(os.path.abspath(state_dir), LOG_NAME))


def refresh() -> None:
    """Take in what the other processes of the build appended to the attached log."""
    _memo.refresh()


def file_digest(path: str | Path) -> str:
    """BLAKE3 hex of a file's content (remembered by signature; see the module's docstring)."""
    return _memo.digest(path)
