"""A store in a local directory.

Layout under ``root``::

    blobs/<id[:2]>/<id>     committed blobs: a zstd stream each, servable as a .zst file as is
    objects/<key>           objects; a key's ``/`` separated segments are directories
    tmp/                    temporaries (blob uploads in progress, objects being replaced)

Nothing is ever written to a final name. A blob is written to a temporary created with
``O_CREAT | O_EXCL`` under ``tmp/``, fsynced, then hard-linked to its final name (if that name
exists, the content is identical: the temporary is dropped and the existing file's mtime is set
to now, so garbage collection sees the content as fresh) and its directory fsynced. An
object is written to a temporary, fsynced and ``os.replace``d over its name; ``put_if_absent``
hard-links the temporary instead, which fails if the name exists, so exactly one racer wins.
``tmp/`` and the final names are on one filesystem, which is what makes link and rename atomic.

Modification times are the files' mtimes. ``delete_if_older`` and ``blob_delete_if_older`` never
lose a concurrent write: they rename the file into ``tmp/`` (atomic), then look at the mtime of
what they took. If it was written at or after the cutoff (a write landed between the decision
and the rename), it is hard-linked back to its name, unless a newer write is already there; a
write after the rename simply creates the name again. A blob commit whose target disappears
between its link and its mtime refresh links again. Readers can miss an object or blob for
the instant it spends under ``tmp/``, which only happens when such a write races the deletion.

Objects under ``PRIVATE_PREFIX`` (``objects/config/``: the token secret, signing keys) are
written with mode 0600 in a 0700 directory, everything else 0644 (the umask may narrow both).
A process running as root gives each file and directory it creates to the owner of the
directory it is created in (of ``objects/`` for temporaries), when that is another user
(``sudo larder cache create`` on a server's store), so the server can still read it.
Opening a store whose ``objects/config`` others can enter (a store made before this rule)
narrows it to 0700 and warns; its older files are narrowed as they are written again.

Temporaries left by a crash are removed when a :class:`DiskStorage` is opened and after each
collection (:meth:`DiskStorage.housekeep`), once older than ``stale_temp_age`` seconds (a live
upload keeps its temporary's mtime fresh).

A collection must be able to start on a full disk (it writes its lease before it deletes): a
collection leaves ``tmp/reserve`` (:data:`RESERVE_SIZE` bytes) behind, which
:meth:`DiskStorage.release_reserve` deletes when a write the collection needs finds no space.

A read that finds nothing (a miss, an empty listing) costs one more ``stat``: that of ``objects/``
or ``blobs/``. If it is gone (the volume unmounted or wiped under a running server), the read
raises :class:`~larder.errors.StorageUnavailable` instead of reporting a miss, so requests are
answered 503 and counted as backend errors rather than 404 for every cache and entry.

A level listing (``list_level``) is one ``scandir`` of the level's directory; a subdirectory is
listed as a level only if an object lies below it, which is looked for depth first and stops at
the first one (deletions leave empty directories behind).

One limit of mapping keys to paths: a key cannot also be the directory of another key
(``a`` and ``a/b``); storing the second raises :class:`~larder.errors.Conflict`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import hashlib
import io
import logging
import os
import stat
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, ClassVar, cast

from larder.errors import Conflict, StorageError, StorageFull, StorageUnavailable
from larder.storage.base import (
    PRIVATE_PREFIX,
    BlobInfo,
    BlobReader,
    BlobWriter,
    LevelEntry,
    ObjectInfo,
    Storage,
    StoredBlob,
    check_blob_id,
    check_directory,
    check_key,
    check_limit,
    check_prefix,
    is_valid_key,
)
from larder.storage.blobformat import (
    DEFAULT_ZSTD_LEVEL,
    READ_CHUNK,
    EncodingBlobWriter,
    check_stored,
    check_zstd_level,
    clamp_range,
)

log = logging.getLogger(__name__)

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# The volume cannot be written now (remounted read-only after errors, failing, permissions
# taken away): unavailable, as an unreachable bucket is, so readiness takes the replica out.
_UNAVAILABLE_ERRNOS = frozenset({errno.EROFS, errno.EIO, errno.EACCES})
# link(2) is not supported everywhere (some network and FUSE filesystems): fall back to rename.
_NO_LINK_ERRNOS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK})
_MISSING = (FileNotFoundError, NotADirectoryError, IsADirectoryError)
_HEX = frozenset("0123456789abcdef")
_FILE_MODE = 0o644
#: Bytes kept in ``tmp/reserve`` for a collection to start on a full disk.
RESERVE_SIZE = 1024**2
#: Free bytes below which the disk takes no upload (a write that filled it leaves about this
#: little behind): :meth:`DiskStorage.room_for`.
ROOM_FLOOR = 1024**2
_RESERVE = "reserve"
#: ``tmp/full``: dated when a write found the disk full (:meth:`DiskStorage.note_full`).
_FULL = "full"
_PRIVATE_FILE_MODE = 0o600
_PRIVATE_DIR_MODE = 0o700


_AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
_CHOWN_WARNED = False


def _hand_over(made: Path | int, parent: Path) -> None:
    """Give ``made`` (a path, or an open file's descriptor) to the owner of ``parent``, the
    directory it was created in, when this process runs as root and that owner is another
    user (``sudo larder cache create`` on a server's store, a volume the server's user owns or
    its group may write): the server must still read what root wrote there. Best effort: a
    root without ``CAP_CHOWN`` (NFS root squash, dropped capabilities) keeps what it made."""
    if not _AS_ROOT:
        return
    try:
        st = parent.stat()
        if st.st_uid == 0:
            return
        if isinstance(made, int):
            os.fchown(made, st.st_uid, st.st_gid)
        else:
            os.chown(made, st.st_uid, st.st_gid)
    except OSError as exc:
        global _CHOWN_WARNED
        if not _CHOWN_WARNED:  # once: every file would say the same
            _CHOWN_WARNED = True
            log.warning(
                "cannot give what this root process creates in %s to its owner (%s): the "
                "server may not read it; run larder commands as the store's user",
                parent,
                exc.strerror or exc,
            )


@contextmanager
def _os_errors(operation: str) -> Iterator[None]:
    """Translate ``OSError`` into storage errors, naming the file."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _FULL_ERRNOS:
            raise StorageFull(f"disk storage: {operation}: no space left on device") from exc
        reason = exc.strerror or type(exc).__name__
        if exc.filename:
            reason += f": {exc.filename}"
        if exc.errno in _UNAVAILABLE_ERRNOS:
            raise StorageUnavailable(f"disk storage: {operation} failed: {reason}") from exc
        raise StorageError(f"disk storage: {operation} failed: {reason}") from exc


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link(source: Path, target: Path) -> None:
    """Hard-link ``source`` to ``target``; ``FileExistsError`` if ``target`` exists.

    Where the filesystem has no hard links, rename instead (not atomic against a racing creator
    of ``target``, the best such a filesystem allows).
    """
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_LINK_ERRNOS:
            raise
        if target.exists():
            raise FileExistsError(errno.EEXIST, "File exists", str(target)) from None
        os.rename(source, target)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot remove temporary %s: %s", path, exc)


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's ``sync_file_range(2)``, which Python's ``os`` does not offer; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return cast("Callable[[int, int, int, int], int]", function)


_SYNC_FILE_RANGE = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2
#: A blob's written bytes are handed to the disk every this many bytes, so that the fsync at
#: commit waits only for the tail.
WRITEBACK_STEP = 4 * 1024 * 1024


class _DiskBlobWriter(EncodingBlobWriter):
    def __init__(self, storage: DiskStorage, encoded: bool) -> None:
        super().__init__(level=storage._zstd_level, threads=storage._zstd_threads, encoded=encoded)
        self._storage = storage
        self._fd, self._temp = storage._create_temp("blob")
        self._written = 0
        self._flushed = 0

    def _sink(self, piece: bytes) -> None:
        with _os_errors("blob write"):
            _write_all(self._fd, piece)
        self._written += len(piece)
        if _SYNC_FILE_RANGE is not None and self._written - self._flushed >= WRITEBACK_STEP:
            # Start writing back what is there (asynchronously; failures surface at fsync).
            _SYNC_FILE_RANGE(
                self._fd, self._flushed, self._written - self._flushed, _SYNC_FILE_RANGE_WRITE
            )
            self._flushed = self._written

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def _publish(self, info: BlobInfo) -> tuple[int, bytes | None]:
        final = self._storage._blob_path(info.blob_id)
        kept_size, kept_sha256 = info.stored_size, info.stored_sha256
        with _os_errors("blob commit"):
            os.fsync(self._fd)
            self._close_fd()
            created = self._storage._make_parent(final)
            try:
                _link(self._temp, final)
            except FileExistsError:
                # The same content is already stored: keep it, but as of now (read through, so
                # the sha256 of its bytes is known), unless it was damaged at rest (cut short,
                # overwritten): then this writer's bytes replace it.
                try:
                    os.utime(final)
                    with final.open("rb") as stored:
                        kept_size = os.fstat(stored.fileno()).st_size
                        kept_sha256 = _same_bytes(stored, kept_size, info) or check_stored(
                            stored, info.blob_id, info.size
                        )
                    if kept_sha256 is None:
                        log.warning("blob %s was damaged at rest: replaced", info.blob_id)
                        os.replace(self._temp, final)
                        kept_size, kept_sha256 = info.stored_size, info.stored_sha256
                except FileNotFoundError:
                    # Deleted (by garbage collection) since the link failed: link again. If
                    # that fails too, another commit of this content has just created it.
                    try:
                        _link(self._temp, final)
                    except FileExistsError:
                        kept_sha256 = None
                    kept_size = os.stat(final).st_size
            self._temp.unlink(missing_ok=True)
            _fsync_dir(final.parent)
            if created:
                _fsync_dir(final.parent.parent)
        return kept_size, kept_sha256

    def _discard(self) -> None:
        try:
            self._close_fd()
        except OSError as exc:
            log.warning("cannot close blob temporary: %s", exc)
        _unlink_quietly(self._temp)


def _same_bytes(stored: BinaryIO, size: int, info: BlobInfo) -> bytes | None:
    """The sha256 of ``stored`` when it holds the very bytes this writer verified (same size,
    same sha256: larder's own encoding is the same for the same content), else ``None`` with
    ``stored`` rewound. Cheaper than decoding it again."""
    if info.stored_sha256 is None or size != info.stored_size:
        return None
    digest = hashlib.sha256()
    while piece := stored.read(READ_CHUNK):
        digest.update(piece)
    stored.seek(0)
    return info.stored_sha256 if digest.digest() == info.stored_sha256 else None


class _DiskBlobReader(BlobReader):
    def __init__(self, file: io.FileIO, path: Path, stored_size: int) -> None:
        self._file = file
        self.local_path = path
        self.stored_size = stored_size

    def _read(self, length: int, offset: int) -> bytes:
        if self._file.closed:
            raise ValueError("blob reader is closed")
        with _os_errors("blob read"):
            return os.pread(self._file.fileno(), length, offset)

    async def chunks(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        start, stop = clamp_range(start, end, self.stored_size)
        offset = start
        while offset < stop:
            data = await asyncio.to_thread(self._read, min(READ_CHUNK, stop - offset), offset)
            if not data:
                raise StorageError("disk storage: blob read failed: file is truncated")
            yield data
            offset += len(data)

    def fileno(self) -> int | None:
        return None if self._file.closed else self._file.fileno()

    async def close(self) -> None:
        self._file.close()


class DiskStorage(Storage):
    """Blobs and objects under one local directory (see the module docstring for the layout)."""

    backend: ClassVar[str] = "disk"

    def __init__(
        self,
        root: Path | str,
        zstd_level: int = DEFAULT_ZSTD_LEVEL,
        *,
        zstd_threads: int = 0,
        stale_temp_age: float = 3600.0,
        create: bool = True,
    ) -> None:
        """Open the store in ``root``, creating its directories; with ``create=False`` a
        ``root`` that does not exist is :class:`StorageUnavailable` and nothing is created."""
        self.root = Path(root)
        if not create and not self.root.is_dir():
            raise StorageUnavailable(f"disk storage: no store at {self.root}")
        self._zstd_level = check_zstd_level(zstd_level)
        self._zstd_threads = zstd_threads
        self._stale_temp_age = stale_temp_age
        self._blobs = self.root / "blobs"
        self._objects = self.root / "objects"
        self._tmp = self.root / "tmp"
        self._private = self._objects / PRIVATE_PREFIX.rstrip("/")
        with _os_errors("open"):
            self.root.mkdir(parents=True, exist_ok=True)
            for directory in (self._blobs, self._objects, self._tmp):
                self._mkdir(directory)
            self._mkdir(self._private, _PRIVATE_DIR_MODE)
            self._remove_stale_temporaries(stale_temp_age)
        self._keep_private()

    def __repr__(self) -> str:
        return f"DiskStorage({str(self.root)!r})"

    # -- paths and temporaries -----------------------------------------------------------

    def _blob_path(self, blob_id: str) -> Path:
        return self._blobs / blob_id[:2] / blob_id

    def _object_path(self, key: str) -> Path:
        return self._objects / check_key(key)

    def _still_there(self, directory: Path) -> None:
        """After a read found nothing under ``directory`` (``objects/`` or ``blobs/``): raise
        :class:`StorageUnavailable` if it is gone (the volume unmounted or wiped), so what is
        reported is a store that cannot be read, not a miss. One ``stat``, on misses only."""
        try:
            if stat.S_ISDIR(os.stat(directory).st_mode):
                return
        except _MISSING:
            pass
        raise StorageUnavailable(
            f"disk storage: {directory} is missing (the volume unmounted or wiped?)"
        )

    def _mkdir(self, directory: Path, mode: int = 0o777) -> None:
        """Create ``directory`` if missing (its parent exists); as root, given to the parent's
        owner (:func:`_hand_over`)."""
        try:
            directory.mkdir(mode=mode)
        except FileExistsError:
            return
        _hand_over(directory, directory.parent)

    def _keep_private(self) -> None:
        """Narrow ``objects/config`` to the server's user if others can enter it (a store made
        before secrets were kept private), and say so: what is inside may have been read."""
        try:
            mode = stat.S_IMODE(self._private.stat().st_mode)
            if not mode & 0o077:
                return
            os.chmod(self._private, _PRIVATE_DIR_MODE)
            if stat.S_IMODE(self._private.stat().st_mode) & 0o077:  # a mount that ignores it
                raise PermissionError(errno.EPERM, "the file system keeps its mode")
        except OSError as exc:
            log.warning(
                "%s holds the token secret and signing keys and other users can read it, "
                "and it could not be narrowed: %s",
                self._private,
                exc.strerror or exc,
            )
            return
        log.warning(
            "%s holds the token secret and signing keys and was readable by other users "
            "(mode %o): narrowed to %o; consider new signing keys (larder cache rotate-key) "
            "and a new token secret",
            self._private,
            mode,
            _PRIVATE_DIR_MODE,
        )

    def _create_temp(self, kind: str, mode: int = _FILE_MODE) -> tuple[int, Path]:
        path = self._tmp / f"{kind}-{uuid.uuid4().hex}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        with _os_errors("create temporary"):
            fd = os.open(path, flags, mode)
            _hand_over(fd, self._objects)
            return fd, path

    def _make_parent(self, path: Path) -> bool:
        """Create ``path``'s directory; ``True`` if it had to be created."""
        missing: list[Path] = []
        directory = path.parent
        while not directory.is_dir():  # up to the first that exists (the store's root does)
            missing.append(directory)
            directory = directory.parent
        if not missing:
            return False
        try:
            for directory in reversed(missing):
                self._mkdir(directory)
        except NotADirectoryError:
            pass  # a key is in the way: said just below
        if not path.parent.is_dir():
            raise Conflict("disk storage: a key cannot also be the directory of another key")
        return True

    def _remove_stale_temporaries(self, max_age: float) -> None:
        cutoff = time.time() - max_age
        removed = 0
        with os.scandir(self._tmp) as entries:
            for entry in entries:
                if entry.name in (_RESERVE, _FULL):
                    continue
                try:
                    if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime <= cutoff:
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:
                    continue
        if removed:
            log.info("removed %d stale temporaries from %s", removed, self._tmp)

    async def room_for(self, size: int) -> bool:
        return await asyncio.to_thread(self._room_for, size)

    def _room_for(self, size: int) -> bool:
        """From ``statvfs`` of ``tmp/``: the blocks and files this process may still take (root
        may take those the file system keeps back for it), at least :data:`ROOM_FLOOR` bytes;
        a file system that counts nothing (some FUSE mounts) has room."""
        try:
            found = os.statvfs(self._tmp)
        except OSError:
            return True  # the write itself says what is wrong
        root = os.geteuid() == 0
        files = found.f_ffree if root else found.f_favail
        if found.f_files and not files:  # a file system counting files has none left
            return False
        if not found.f_blocks:
            return True
        free = (found.f_bfree if root else found.f_bavail) * found.f_frsize
        return free >= max(size, ROOM_FLOOR)

    async def note_full(self) -> None:
        await asyncio.to_thread(self._note_full)

    def _note_full(self) -> None:
        """Date ``tmp/full`` now (an empty file: it takes no block, only a file once)."""
        marker = self._tmp / _FULL
        try:
            os.utime(marker)
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                marker.touch()
        except OSError:
            pass

    async def full_since(self) -> float | None:
        try:
            return (await asyncio.to_thread(os.stat, self._tmp / _FULL)).st_mtime
        except OSError:
            return None

    async def release_reserve(self) -> bool:
        with _os_errors("release reserve"):
            return await asyncio.to_thread(self._unlink, self._tmp / _RESERVE)

    async def housekeep(self) -> None:
        with _os_errors("housekeeping"):
            await asyncio.to_thread(self._housekeep)

    def _housekeep(self) -> None:
        self._remove_stale_temporaries(self._stale_temp_age)
        reserve = self._tmp / _RESERVE
        if reserve.exists():
            return
        try:
            self._write_reserve(reserve)
        except StorageFull:
            log.warning("no space for the %d-byte reserve in %s yet", RESERVE_SIZE, self._tmp)

    def _write_reserve(self, reserve: Path) -> None:
        fd, temp = self._create_temp("reserve")
        try:
            with _os_errors("write reserve"):
                try:  # random bytes: a compressing file system keeps them
                    for _ in range(RESERVE_SIZE // 65536):
                        _write_all(fd, os.urandom(65536))
                finally:
                    os.close(fd)
                os.replace(temp, reserve)
        except BaseException:
            _unlink_quietly(temp)
            raise

    def _write_temp(self, data: bytes, path: Path) -> Path:
        """A temporary holding ``data``, with the mode the object at ``path`` gets."""
        private = path.is_relative_to(self._private)
        fd, temp = self._create_temp("object", _PRIVATE_FILE_MODE if private else _FILE_MODE)
        try:
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            _unlink_quietly(temp)
            raise
        return temp

    # -- blobs ---------------------------------------------------------------------------

    def blob_writer(self, *, encoded: bool = False) -> BlobWriter:
        return _DiskBlobWriter(self, encoded)

    def _blob_open_sync(self, blob_id: str) -> BlobReader | None:
        path = self._blob_path(blob_id)
        try:
            file = io.FileIO(path, "r")
        except _MISSING:
            self._still_there(self._blobs)
            return None
        try:
            size = os.fstat(file.fileno()).st_size
        except BaseException:
            file.close()
            raise
        return _DiskBlobReader(file, path, size)

    async def blob_open(self, blob_id: str) -> BlobReader | None:
        check_blob_id(blob_id)
        with _os_errors("blob open"):
            return await asyncio.to_thread(self._blob_open_sync, blob_id)

    def _blob_size_sync(self, blob_id: str) -> int | None:
        try:
            return self._blob_path(blob_id).stat().st_size
        except _MISSING:
            self._still_there(self._blobs)
            return None

    async def blob_stored_size(self, blob_id: str) -> int | None:
        check_blob_id(blob_id)
        with _os_errors("blob stat"):
            return await asyncio.to_thread(self._blob_size_sync, blob_id)

    def _unlink(self, path: Path) -> bool:
        try:
            path.unlink()
        except _MISSING:
            return False
        return True

    async def blob_delete(self, blob_id: str) -> bool:
        check_blob_id(blob_id)
        with _os_errors("blob delete"):
            return await asyncio.to_thread(self._unlink, self._blob_path(blob_id))

    def _list_blob_dir(self, name: str) -> list[str]:
        try:
            names = os.listdir(self._blobs / name)
        except _MISSING:
            return []
        return [n for n in names if n[:2] == name and len(n) == 64 and _HEX.issuperset(n)]

    def _blob_dirs_sync(self) -> list[str]:
        try:
            return os.listdir(self._blobs)
        except _MISSING:
            self._still_there(self._blobs)
            raise

    async def blob_ids(self) -> AsyncIterator[str]:
        with _os_errors("blob list"):
            directories = await asyncio.to_thread(self._blob_dirs_sync)
        for name in sorted(directories):
            if len(name) != 2 or not _HEX.issuperset(name):
                continue
            with _os_errors("blob list"):
                ids = await asyncio.to_thread(self._list_blob_dir, name)
            for blob_id in ids:
                yield blob_id

    def _stat_blob_dir(self, name: str) -> list[StoredBlob]:
        found = []
        for blob_id in self._list_blob_dir(name):
            try:
                st = os.stat(self._blobs / name / blob_id)
            except _MISSING:
                continue  # deleted since the listing
            found.append(StoredBlob(blob_id, st.st_size, st.st_mtime))
        return found

    async def blob_infos(self) -> AsyncIterator[StoredBlob]:
        with _os_errors("blob list"):
            directories = await asyncio.to_thread(self._blob_dirs_sync)
        for name in sorted(directories):
            if len(name) != 2 or not _HEX.issuperset(name):
                continue
            with _os_errors("blob list"):
                infos = await asyncio.to_thread(self._stat_blob_dir, name)
            for info in infos:
                yield info

    def _delete_if_older_sync(self, path: Path, cutoff: float) -> bool:
        """Delete the file at ``path`` if its mtime is before ``cutoff``, losing no racing write.

        The file is renamed into ``tmp/`` (atomic) and the mtime checked on what was taken: a
        file written after the decision goes back with a hard link, which fails (and the taken
        file is dropped) if an even newer write has created the name again meanwhile.
        """
        try:
            st = os.lstat(path)
        except _MISSING:
            return False
        if not stat.S_ISREG(st.st_mode) or not st.st_mtime < cutoff:
            return False  # fresh, or a directory (not an object)
        taken = self._tmp / f"delete-{uuid.uuid4().hex}"
        try:
            os.rename(path, taken)
        except _MISSING:
            return False  # deleted meanwhile
        try:
            st = os.lstat(taken)
        except FileNotFoundError:
            return False  # swept as a stale temporary by another opener: not ours to count
        if stat.S_ISREG(st.st_mode) and st.st_mtime < cutoff:
            os.unlink(taken)
            return True
        # Written again between the decision and the rename (or, improbably, replaced by a
        # directory): put it back unless something newer is already there.
        try:
            self._make_parent(path)
            if stat.S_ISREG(st.st_mode):
                _link(taken, path)
            else:
                os.rename(taken, path)
            _fsync_dir(path.parent)
        except FileExistsError:
            pass  # a newer write won; what we took is older than it
        except BaseException:
            log.error("could not put %s back after a deletion race; it is kept at %s", path, taken)
            raise
        _unlink_quietly(taken)
        return False

    async def blob_delete_if_older(self, blob_id: str, cutoff: float) -> bool:
        check_blob_id(blob_id)
        path = self._blob_path(blob_id)
        with _os_errors("blob delete"):
            return await asyncio.to_thread(self._delete_if_older_sync, path, cutoff)

    # -- objects -------------------------------------------------------------------------

    def _get_sync(self, path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except _MISSING:
            self._still_there(self._objects)
            return None

    async def get(self, key: str) -> bytes | None:
        path = self._object_path(key)
        with _os_errors("get"):
            return await asyncio.to_thread(self._get_sync, path)

    def _put_sync(self, path: Path, data: bytes) -> None:
        temp = self._write_temp(data, path)
        try:
            self._make_parent(path)
            try:
                os.replace(temp, path)
            except IsADirectoryError:
                raise Conflict(
                    "disk storage: a key cannot also be the directory of another key"
                ) from None
            _fsync_dir(path.parent)
        except BaseException:
            _unlink_quietly(temp)
            raise

    async def put(self, key: str, data: bytes) -> None:
        path = self._object_path(key)
        with _os_errors("put"):
            await asyncio.to_thread(self._put_sync, path, data)

    def _put_if_absent_sync(self, path: Path, data: bytes) -> bool:
        if path.exists():
            return False
        temp = self._write_temp(data, path)
        try:
            self._make_parent(path)
            try:
                os.link(temp, path)
            except FileExistsError:
                return False
            _fsync_dir(path.parent)
            return True
        finally:
            _unlink_quietly(temp)

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self._object_path(key)
        with _os_errors("put"):
            return await asyncio.to_thread(self._put_if_absent_sync, path, data)

    def _exists_sync(self, path: Path) -> bool:
        if path.is_file():
            return True
        self._still_there(self._objects)
        return False

    async def exists(self, key: str) -> bool:
        path = self._object_path(key)
        with _os_errors("exists"):
            return await asyncio.to_thread(self._exists_sync, path)

    async def delete(self, key: str) -> bool:
        path = self._object_path(key)
        with _os_errors("delete"):
            return await asyncio.to_thread(self._unlink, path)

    def _walk_objects(self, prefix: str) -> Iterator[str]:
        """The keys of the files under ``objects/`` that start with ``prefix``, unsorted."""
        directory, _, _ = prefix.rpartition("/")
        start = self._objects / directory if directory else self._objects

        def fail(exc: OSError) -> None:
            if not isinstance(exc, _MISSING):
                raise exc

        for dirpath, _dirnames, filenames in os.walk(start, onerror=fail):
            relative = Path(dirpath).relative_to(self._objects).as_posix()
            base = "" if relative == "." else relative + "/"
            for name in filenames:
                key = base + name
                if key.startswith(prefix) and is_valid_key(key):
                    yield key

    def _keys_sync(self, prefix: str) -> list[str]:
        found = sorted(self._walk_objects(prefix))
        if not found:
            self._still_there(self._objects)
        return found

    def _object_infos_sync(self, prefix: str) -> list[ObjectInfo]:
        found = []
        for key in sorted(self._walk_objects(prefix)):
            try:
                st = os.stat(self._objects / key)
            except _MISSING:
                continue  # deleted since the walk
            found.append(ObjectInfo(key, st.st_size, st.st_mtime))
        if not found:
            self._still_there(self._objects)
        return found

    async def keys(self, prefix: str) -> AsyncIterator[str]:
        check_prefix(prefix)
        with _os_errors("list"):
            found = await asyncio.to_thread(self._keys_sync, prefix)
        for key in found:
            yield key

    async def object_infos(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        check_prefix(prefix)
        with _os_errors("list"):
            infos = await asyncio.to_thread(self._object_infos_sync, prefix)
        for info in infos:
            yield info

    def _holds_object(self, directory: str) -> bool:
        """Whether an object lies anywhere under ``directory``: depth first, stopping at the
        first one (a directory that deletions left empty holds none)."""
        pending = [directory]
        while pending:
            below = []
            try:
                with os.scandir(pending.pop()) as entries:
                    for entry in entries:
                        if not is_valid_key(entry.name):
                            continue
                        if not entry.is_dir(follow_symlinks=False):
                            return True
                        below.append(entry.path)
            except _MISSING:
                continue
            pending.extend(reversed(below))
        return False

    def _list_level_sync(self, prefix: str, limit: int) -> list[LevelEntry]:
        names: list[tuple[str, os.DirEntry[str], bool]] = []
        try:
            with os.scandir(self._objects / prefix if prefix else self._objects) as entries:
                for entry in entries:
                    if is_valid_key(entry.name):
                        level = entry.is_dir(follow_symlinks=False)
                        names.append((prefix + entry.name + ("/" if level else ""), entry, level))
        except _MISSING:
            pass
        if not names:
            self._still_there(self._objects)
            return []
        names.sort(key=lambda item: item[0])
        found: list[LevelEntry] = []
        for _, entry, level in names:
            if len(found) >= limit:
                break
            if level:
                if self._holds_object(entry.path):
                    found.append(LevelEntry(entry.name, None))
                continue
            try:
                st = entry.stat()
            except _MISSING:
                continue  # deleted since the listing
            info = ObjectInfo(prefix + entry.name, st.st_size, st.st_mtime)
            found.append(LevelEntry(entry.name, info))
        return found

    async def list_level(self, prefix: str, *, limit: int) -> AsyncIterator[LevelEntry]:
        check_directory(prefix)
        check_limit(limit)
        with _os_errors("list"):
            found = await asyncio.to_thread(self._list_level_sync, prefix, limit)
        for entry in found:
            yield entry

    async def delete_if_older(self, key: str, cutoff: float) -> bool:
        path = self._object_path(key)
        with _os_errors("delete"):
            return await asyncio.to_thread(self._delete_if_older_sync, path, cutoff)

    # -- lifecycle -----------------------------------------------------------------------

    def _check_sync(self) -> None:
        for directory in (self.root, self._blobs, self._objects, self._tmp):
            if not directory.is_dir():
                raise StorageError("disk storage: the storage directory is missing")
        fd, temp = self._create_temp("check")
        os.close(fd)
        temp.unlink()

    async def check(self) -> None:
        with _os_errors("check"):
            await asyncio.to_thread(self._check_sync)
