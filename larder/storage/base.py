"""The storage interface every backend implements.

Two kinds of data live in a store:

* **Blobs**: content-addressed by the BLAKE3 hex digest of their *uncompressed* bytes and kept
  zstd-compressed at rest (a zstd stream: the writer's own encoding, or one the caller verified
  and hands over as it is). A blob is written through a :class:`BlobWriter`
  into a temporary object and becomes visible under ``blob_id`` only on :meth:`BlobWriter.commit`,
  which callers invoke after they have verified the content. Identical content is stored once.
  Readers get the *stored* (compressed) bytes, so a blob can be served as a ``.zst`` file as is.
* **Objects**: small keyed byte strings (metadata: narinfos, records, configuration), written
  atomically (a reader sees the old or the new value, never a mix). Objects under
  :data:`PRIVATE_PREFIX` hold secrets (the token secret, signing keys): a backend that has
  permissions of its own keeps them to the server's own user (disk: mode 0600, in a 0700
  directory).

Keys are ``/``-separated segments of ``[A-Za-z0-9._:!+=@?-]``; no segment is empty, ``.`` or
``..``; at most 1024 characters (``?`` because store path names, and so the build logs Nix
uploads, may contain it). Backends check this (:func:`check_key`) as a second line of defence;
the service validates user input long before.

Blob writing is synchronous and blocking (it compresses and does I/O), meant to be driven from a
worker thread by a streaming pipeline. Everything else is ``async``. Backends raise only
:mod:`larder.errors` storage errors (``StorageFull``, ``StorageUnavailable``, ``StorageError``);
a missing object or blob is a ``None``/``False`` return value, never an exception.

Every object and blob has a modification time, for garbage collection: an object's is its last
write (``put``, a creating ``put_if_absent``), a blob's its last commit, including a commit of
content that was already stored. A collector lists ages (:meth:`Storage.object_infos`,
:meth:`Storage.blob_infos`), decides, and deletes with :meth:`Storage.delete_if_older` and
:meth:`Storage.blob_delete_if_older`, which keep anything written again after the cutoff. Times
are POSIX seconds from the backend's clock (the filesystem's, S3's), which may differ from the
caller's by clock skew and resolution (S3 reports whole seconds): cutoffs need a margin.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import ClassVar

_KEY_SEGMENT = re.compile(r"[A-Za-z0-9._:!+=@?-]+")
_BLOB_ID = re.compile(r"[0-9a-f]{64}")
MAX_KEY_LENGTH = 1024
#: Keys under this prefix hold secrets: readable by the server's own user only, where the
#: backend can say so.
PRIVATE_PREFIX = "config/"


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid object key, else raise ``ValueError``."""
    if not key or len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"invalid storage key length: {len(key)}")
    for segment in key.split("/"):
        if segment in ("", ".", "..") or not _KEY_SEGMENT.fullmatch(segment):
            raise ValueError(f"invalid storage key: {key!r}")
    return key


def is_valid_key(key: str) -> bool:
    """Whether ``key`` is a valid object key (:func:`check_key` without the exception)."""
    try:
        check_key(key)
    except ValueError:
        return False
    return True


def check_prefix(prefix: str) -> str:
    """Return ``prefix`` if it can start a valid key (for :meth:`Storage.keys`), else raise.

    A prefix is complete segments followed by a possibly empty, possibly partial last segment:
    ``""``, ``"caches/"``, ``"caches/ma"`` are prefixes; ``"../"``, ``"a//"``, ``"/a"`` are not.
    """
    if len(prefix) > MAX_KEY_LENGTH:
        raise ValueError(f"invalid storage key prefix length: {len(prefix)}")
    *segments, last = prefix.split("/")
    for segment in segments:
        if segment in ("", ".", "..") or not _KEY_SEGMENT.fullmatch(segment):
            raise ValueError(f"invalid storage key prefix: {prefix!r}")
    if last and not _KEY_SEGMENT.fullmatch(last):
        raise ValueError(f"invalid storage key prefix: {prefix!r}")
    return prefix


def check_directory(prefix: str) -> str:
    """Return ``prefix`` if it names a level of keys (for :meth:`Storage.list_level`), else raise.

    That is ``""`` (the top) or complete segments each followed by ``/``: ``"caches/"``,
    ``"caches/main/"``; not ``"caches"`` nor ``"caches/ma"``.
    """
    if prefix and (not prefix.endswith("/") or len(prefix) > MAX_KEY_LENGTH):
        raise ValueError(f"invalid storage key level: {prefix!r}")
    return check_prefix(prefix)


def check_limit(limit: int) -> int:
    """Return ``limit`` if it is a positive count of entries to list, else raise."""
    if limit < 1:
        raise ValueError(f"a listing limit must be positive: {limit}")
    return limit


def check_blob_id(blob_id: str) -> str:
    """Return ``blob_id`` if it is 64 lowercase hex digits, else raise ``ValueError``."""
    if not _BLOB_ID.fullmatch(blob_id):
        raise ValueError(f"invalid blob id: {blob_id!r}")
    return blob_id


@dataclass(frozen=True)
class BlobInfo:
    """A committed blob: its content address and sizes."""

    blob_id: str  # BLAKE3 hex of the uncompressed bytes
    size: int  # uncompressed bytes
    stored_size: int  # compressed bytes at rest
    #: sha256 of the bytes at rest, when known: the committing writer's own, or, when the
    #: backend kept an earlier commit's bytes, what it recorded with them (S3); else None.
    stored_sha256: bytes | None = field(default=None, compare=False)


@dataclass(frozen=True)
class ObjectInfo:
    """An object's key, size and modification time, as :meth:`Storage.object_infos` lists it."""

    key: str
    size: int  # bytes of the object
    modified: float  # POSIX time of the last write (put, put_if_absent)


@dataclass(frozen=True)
class LevelEntry:
    """One name one level below a prefix, as :meth:`Storage.list_level` lists it."""

    name: str  # one key segment: the key (or the level) is the prefix followed by it
    info: ObjectInfo | None  # the object ``prefix + name``; ``None`` for a level with keys below

    @property
    def is_level(self) -> bool:
        return self.info is None


def level_order(prefix: str, entry: LevelEntry) -> str:
    """The sort key of ``entry`` in a listing of ``prefix``: the key an object has, a level as
    ``prefix + name + "/"`` (S3's order, so every backend truncates a listing alike)."""
    return prefix + entry.name + ("/" if entry.info is None else "")


@dataclass(frozen=True)
class StoredBlob:
    """A committed blob as :meth:`Storage.blob_infos` lists it."""

    blob_id: str
    stored_size: int  # compressed bytes at rest
    modified: float  # POSIX time of the last commit of this content (a repeated commit counts)


class BlobWriter(ABC):
    """Streams one blob into a temporary object. Synchronous: call from a worker thread.

    Use as a context manager: leaving the block without :meth:`commit` aborts, so an exception
    or a failed verification never leaves a visible (or a leaked temporary) object.
    """

    @abstractmethod
    def write(self, data: bytes | memoryview) -> None:
        """Hash and compress ``data`` and append it to the temporary object.

        A writer made with ``encoded=True`` only hashes ``data``: the stored bytes are what the
        caller passes to :meth:`write_encoded`.
        """

    def write_encoded(self, piece: bytes) -> None:
        """Append ``piece`` of a zstd stream (RFC 8878) the caller encoded, or received and
        decoded itself, to the temporary object as it is (writers made with ``encoded=True``).

        The caller answers for the stream decoding to exactly the bytes it passed to
        :meth:`write`, which is what the blob id is computed over.
        """
        raise ValueError("this blob writer encodes the stream itself")

    @property
    @abstractmethod
    def size(self) -> int:
        """Uncompressed bytes written so far."""

    @abstractmethod
    def commit(
        self, expected_id: str | None = None, *, stored_sha256: bytes | None = None
    ) -> BlobInfo:
        """Finish the stream and make the blob visible under its BLAKE3 id.

        Idempotent with respect to content: if the blob already exists the temporary object is
        discarded and the existing blob is kept, but its modification time is refreshed (so a
        garbage collector sees content uploaded again as fresh). After commit the writer is
        closed. With ``expected_id``, content whose id differs is discarded instead and
        :class:`~larder.errors.VerificationFailed` is raised.

        The result's ``stored_sha256`` is the sha256 of the bytes at rest when they are this
        writer's: computed while encoding, or, for a writer made with ``encoded=True``, the
        ``stored_sha256`` the caller gives for the bytes it passed to :meth:`write_encoded`
        (which it hashed anyway: the stream is hashed once).
        """

    @abstractmethod
    def abort(self) -> None:
        """Discard the temporary object. A no-op after commit or a previous abort."""

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()


class BlobReader(ABC):
    """An open blob: its stored (compressed) bytes, readable in a range."""

    stored_size: int
    # Set by backends whose blobs are local files, so the service can use sendfile.
    local_path: Path | None = None

    def fileno(self) -> int | None:
        """The open file's descriptor when the blob is a local file (for ``sendfile(2)``; valid
        until :meth:`close`), else ``None``."""
        return None

    @abstractmethod
    def chunks(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Yield the stored bytes in ``[start, end)`` (``end`` defaults to the end)."""

    @abstractmethod
    async def close(self) -> None:
        """Release the underlying handle."""


class Storage(ABC):
    """One async interface over a blob store and an object store."""

    backend: ClassVar[str]  # "memory", "disk" or "s3": a metrics label and a log field

    # -- blobs ---------------------------------------------------------------------------

    @abstractmethod
    def blob_writer(self, *, encoded: bool = False) -> BlobWriter:
        """Start a new blob. Blocking (may create a temporary object): call from a thread.

        ``encoded``: the caller supplies the zstd stream itself (:meth:`BlobWriter.write_encoded`)
        and the writer only hashes the content.
        """

    @abstractmethod
    async def blob_open(self, blob_id: str) -> BlobReader | None:
        """Open a committed blob for reading, or ``None`` if it does not exist."""

    @abstractmethod
    async def blob_stored_size(self, blob_id: str) -> int | None:
        """Compressed size of a committed blob, or ``None`` if it does not exist."""

    @abstractmethod
    async def blob_delete(self, blob_id: str) -> bool:
        """Delete a blob; ``False`` if it did not exist."""

    @abstractmethod
    def blob_ids(self) -> AsyncIterator[str]:
        """Every committed blob id, in no particular order."""

    @abstractmethod
    def blob_infos(self) -> AsyncIterator[StoredBlob]:
        """Every committed blob with its stored size and modification time, in no particular
        order. Uncommitted uploads are not listed."""

    @abstractmethod
    async def blob_delete_if_older(self, blob_id: str, cutoff: float) -> bool:
        """Delete a blob only if its last commit was strictly before ``cutoff`` (POSIX seconds);
        ``True`` if this call deleted it, ``False`` if it is missing or not older.

        A commit of the same content racing with this call must not be lost: afterwards the
        blob exists. Memory and disk guarantee it; S3 has a one-round-trip window (see there).
        """

    # -- objects -------------------------------------------------------------------------

    @abstractmethod
    async def get(self, key: str) -> bytes | None:
        """The object's bytes, or ``None`` if it does not exist."""

    @abstractmethod
    async def put(self, key: str, data: bytes) -> None:
        """Create or atomically replace an object."""

    @abstractmethod
    async def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create an object only if it does not exist; ``True`` if this call created it.

        Used for state that every replica must agree on (the token secret, signing keys): of two
        racing creators exactly one wins and both then read the winner's value.
        """

    @abstractmethod
    async def exists(self, key: str) -> bool:
        """Whether the object exists."""

    @abstractmethod
    async def delete(self, key: str) -> bool:
        """Delete an object; ``False`` if it did not exist."""

    @abstractmethod
    def keys(self, prefix: str) -> AsyncIterator[str]:
        """Every object key starting with ``prefix`` (a string prefix), in sorted order."""

    @abstractmethod
    def object_infos(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        """Like :meth:`keys` (same prefixes, same order), with each object's size and
        modification time."""

    @abstractmethod
    def list_level(self, prefix: str, *, limit: int) -> AsyncIterator[LevelEntry]:
        """The names one level below ``prefix`` (``""`` or ending in ``/``,
        :func:`check_directory`), at most ``limit`` of them: each object ``prefix + name``
        with its size and time, and each ``name`` under which deeper keys lie as a level
        (``info`` is ``None``). Sorted by :func:`level_order`; a name is both an object and a
        level only where a backend can hold a key and keys below it (not on disk).

        The work is bounded by one level, never by the keys further down: on S3 a listing with
        ``/`` as delimiter that stops after ``limit`` entries, on disk one directory (and, for
        each level listed, a descent only as far as its first object, so that a directory left
        empty by deletions is not listed).
        """

    @abstractmethod
    async def delete_if_older(self, key: str, cutoff: float) -> bool:
        """Delete an object only if its last write was strictly before ``cutoff`` (POSIX
        seconds); ``True`` if this call deleted it, ``False`` if it is missing or not older.

        A write racing with this call must not be lost: afterwards the object holds the
        written value. Memory and disk guarantee it; S3 has a one-round-trip window (see there).
        """

    # -- lifecycle -----------------------------------------------------------------------

    @abstractmethod
    async def check(self) -> None:
        """Raise a storage error unless the backend answers (used by readiness probes)."""

    async def check_writes(self) -> None:
        """Write a small object, read it back and delete it: a storage error when the backend
        gives other bytes back than were written (a store that keeps a transfer encoding as the
        content). Run once at start-up, not by readiness probes. Nothing by default."""
        return None

    async def room_for(self, size: int) -> bool:
        """Whether ``size`` more bytes (0: anything at all) may fit: ``False`` only when the
        backend knows they cannot (a disk with less free, or next to nothing, or no file left to
        create), so that an upload is refused before its body is read. ``True`` by default."""
        return True

    async def note_full(self) -> None:
        """Remember, for every process on this store, that a write found it full now. Nothing
        by default."""
        return None

    async def full_since(self) -> float | None:
        """When a write last found the store full (POSIX seconds, :meth:`note_full`); None if
        never, or unknown."""
        return None

    async def release_reserve(self) -> bool:
        """Free the space a backend keeps back so that a collection can start when it is full;
        ``True`` if some was freed (a backend without a reserve: ``False``)."""
        return False

    async def housekeep(self) -> None:
        """What a collection asks of the backend once it has deleted: remove what crashed
        writers left behind, keep the reserve. Nothing by default."""
        return None

    async def close(self) -> None:
        """Release connections and thread pools."""
        return None
