"""The Nix binary cache: verified NAR and narinfo uploads, signed narinfos, opaque extras.

Upload rules (each failure is a :class:`VerificationFailed` naming the check):

* A NAR arrives as ``nar/<sha256 of the file, nix32>.nar[.xz|.bz2|.zst|.br]``, which is how
  Nix names it (a gzip NAR is named ``.nar``: its magic bytes tell it apart from a plain NAR). It
  is decompressed while streaming, must be a well-formed NAR of at most ``max_nar_size`` bytes,
  and the file's sha256 must equal the name. It is stored once, as a zstd blob keyed by BLAKE3,
  whatever compression it came in; a record ``nar/<NarHash>`` ties this cache to the blob, and
  ``nar-file/<FileHash>`` remembers the name it came under, so Nix's ``HEAD`` of that name
  before an upload finds it.
* A narinfo must parse strictly, its StorePath hash must equal the URL's, a NAR with its NarHash
  and NarSize must be in this cache, and every reference other than the path itself must already
  have a narinfo in this cache (so a served narinfo always has its closure). Its ``CA``, if any,
  must make its store path (:mod:`larder.protocol.content_address`).
* A narinfo carries at most :data:`MAX_SIGNATURES` signatures (each kept once).
* A store path's narinfo, once stored, keeps its contents (StorePath, NarHash, NarSize,
  References, CA): a later upload with the same contents adds its signatures (``nix store
  sign``), one with other contents (a build that is not reproducible, pushed by a second
  machine) is answered as stored and not kept, unless the stored one is unreadable or its NAR
  is gone. A narinfo other paths refer to is never renamed or changed under them.

Served narinfos point at ``nar/<NarHash nix32>.nar.zst`` (``Compression: zstd``, ``FileHash``
and ``FileSize`` of the stored blob, the bytes that URL serves); URL, Compression, FileHash and
FileSize are not covered by Nix signatures, so rewriting them keeps the uploader's ``Sig`` lines
valid. Each is signed on the fly with the cache's key; an older signature by the same key name
is replaced.

Uploads Nix compresses with a ``Content-Encoding`` (narinfos, ``.ls``, logs) are decoded here
and stored decoded; ``debuginfo/<build-id>`` documents are served pointing at the NAR as
larder serves it.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, replace
from typing import TypeVar

from larder.core import keys
from larder.core.blobs import (
    BlobStore,
    decode_document,
    decompressed,
    is_sound,
    load_record,
    record_fields,
)
from larder.core.caches import CacheSettings
from larder.core.decoding import first_allowance
from larder.core.ingest import NarIngest, keeps_upload, peek, pipelined
from larder.core.lastuse import Touch, ignore_use
from larder.core.servedcache import Entry, ServedCache, WriteCounter
from larder.errors import (
    FormatError,
    LarderError,
    StorageError,
    TooLarge,
    VerificationFailed,
)
from larder.protocol import narinfo as narinfo_format
from larder.protocol import nix32
from larder.protocol.compression import GZIP_MAGIC, compression_for_extension
from larder.protocol.content_address import check_store_path
from larder.protocol.hashes import NixHash
from larder.protocol.names import check_object_path
from larder.protocol.narinfo import NarInfo
from larder.protocol.signing import PublicKey
from larder.protocol.storepath import STORE_DIR, check_hash_part
from larder.storage.base import BlobReader, check_blob_id

log = logging.getLogger(__name__)

T = TypeVar("T")

SERVED_EXTENSION = ".zst"
#: Largest ``debuginfo/<build-id>`` document (Nix writes about 200 bytes).
MAX_DEBUGINFO = 64 * 1024
#: Stored narinfos whose rendering is kept (all are dropped when one more comes).
MAX_SOURCES = 20_000
#: Signatures a narinfo may carry (besides the cache's own, made when served): every reader
#: downloads them all with each lookup.
MAX_SIGNATURES = 32
#: A served narinfo's memory key (cache, store hash, signing key) and its use-record key.
ServedKeys = tuple[tuple[str, str, str], str]


def parse_nar_name(name: str) -> tuple[str, str]:
    """Split ``<52 nix32>.nar[.ext]`` into the hash part and the Nix compression name."""
    stem, marker, ext = name.partition(".nar")
    if not marker or len(stem) != nix32.encoded_length(32):
        raise FormatError(f"NAR file name must be <sha256 nix32>.nar[.ext], not {name!r}")
    nix32.decode(stem)
    return stem, compression_for_extension(ext)


def nix_cache_info(settings: CacheSettings) -> bytes:
    return f"StoreDir: {STORE_DIR}\nWantMassQuery: 1\nPriority: {settings.priority}\n".encode()


@dataclass(frozen=True)
class NarRecord:
    """A NAR present in a cache: its blob, sizes, the sha256 (nix32) of the stored bytes and
    the FileHash of the compressed upload that brought it when that differs from its NarHash
    (its :class:`NarFileRecord`, which lives as long as this record). Records written before
    larder kept them have ``None`` for both."""

    blob_id: str
    nar_size: int
    stored_size: int
    file_hash: str | None = None
    uploaded_as: str | None = None

    def to_json(self) -> bytes:
        doc: dict[str, object] = {
            "blob": self.blob_id,
            "nar_size": self.nar_size,
            "stored_size": self.stored_size,
        }
        if self.file_hash is not None:
            doc["file_hash"] = self.file_hash
        if self.uploaded_as is not None:
            doc["uploaded_as"] = self.uploaded_as
        return json.dumps(doc).encode()

    @classmethod
    def from_json(cls, data: bytes) -> NarRecord:
        """The record stored as ``data``; :class:`StorageError` when it is not one."""
        doc = load_record(data)
        file_hash, uploaded_as = doc.get("file_hash"), doc.get("uploaded_as")
        with record_fields("NAR record"):
            return cls(
                check_blob_id(doc["blob"]),
                int(doc["nar_size"]),
                int(doc["stored_size"]),
                str(file_hash) if file_hash is not None else None,
                str(uploaded_as) if uploaded_as is not None else None,
            )


@dataclass(frozen=True)
class NarFileRecord:
    """The name a NAR upload came under: ``nar/<FileHash>.nar<ext>`` held this NAR."""

    nar_hash: str  # nix32
    compression: str

    def to_json(self) -> bytes:
        return json.dumps({"nar_hash": self.nar_hash, "compression": self.compression}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> NarFileRecord:
        doc = load_record(data)
        return cls(str(doc["nar_hash"]), str(doc["compression"]))


@dataclass(frozen=True)
class FileRecord:
    """An opaque object Nix uploaded (``.ls``, ``log/``, ``realisations/``...): its blob, its
    size, and the size of the blob at rest (``None`` in records written before larder kept it)."""

    blob_id: str
    size: int
    content_type: str
    content_encoding: str
    stored_size: int | None = None

    def to_json(self) -> bytes:
        doc: dict[str, object] = {
            "blob": self.blob_id,
            "size": self.size,
            "content_type": self.content_type,
            "content_encoding": self.content_encoding,
        }
        if self.stored_size is not None:
            doc["stored_size"] = self.stored_size
        return json.dumps(doc).encode()

    @classmethod
    def from_json(cls, data: bytes) -> FileRecord:
        """The record stored as ``data``; :class:`StorageError` when it is not one."""
        doc = load_record(data)
        stored = doc.get("stored_size")
        with record_fields("file record"):
            return cls(
                check_blob_id(doc["blob"]),
                int(doc["size"]),
                str(doc["content_type"]),
                str(doc["content_encoding"]),
                int(stored) if stored is not None else None,
            )


class NixCache:
    """Nix binary cache operations over one store. Blocking work runs on ``executor``."""

    def __init__(
        self,
        blobs: BlobStore,
        served_ttl: float = 0.0,
        writes: WriteCounter | None = None,
        touch: Touch = ignore_use,
        max_nar_size: int | None = None,
    ) -> None:
        self._blobs = blobs
        self._max_nar_size = max_nar_size
        self._touch = touch
        self._served = ServedCache(served_ttl, writes=writes)
        # Narinfos being looked up again ahead of their expiry, and the tasks doing it.
        self._refreshing: dict[tuple[str, str, str], asyncio.Task[None]] = {}
        # The stored bytes each remembered narinfo was rendered from: a refresh that reads the
        # same bytes keeps the same body (no parse, no signature, the very same object).
        self._sources: dict[tuple[str, str, str], tuple[bytes, bytes]] = {}
        # NAR records found while serving (a NAR is fetched right after its narinfo, and again
        # by every client), for as long as narinfos are remembered.
        self._records = ServedCache(served_ttl)
        #: Blobs (id, stored size) whose size differs from their records', found sound.
        self._sound: set[tuple[str, int]] = set()
        self._storage = blobs.storage
        self._run = blobs.run

    # -- NARs ----------------------------------------------------------------------------

    async def upload_nar(
        self, cache: CacheSettings, name: str, body: AsyncIterable[bytes]
    ) -> NarRecord:
        """Verify and store an uploaded NAR named ``<filehash>.nar[.ext]``."""
        file_hash, compression = parse_nar_name(name)
        first, chunks = await peek(body)
        if compression == "none" and first.startswith(GZIP_MAGIC):
            compression = "gzip"  # Nix names a gzip NAR .nar (a NAR starts with its length)
        keep = keeps_upload(compression, first)
        async with (
            self._blobs.decoder_memory() as memory,
            self._blobs.writer(encoded=keep) as writer,
        ):
            allowance = first_allowance(memory)
            ingest = NarIngest(
                compression, writer, self._max_nar_size, keep=keep, allowance=allowance
            )
            try:
                await pipelined(
                    chunks, lambda chunk: self._blobs.decode(ingest.feed, ingest, chunk, memory)
                )
                digest = await self._run(ingest.finish)
            finally:
                ingest.close()
                if memory is not None:
                    memory.release()  # the decoder is gone: the commit needs none of it
            if nix32.encode(digest.file_sha256) != file_hash:
                raise VerificationFailed(
                    f"file hash mismatch: the upload's sha256 is "
                    f"{nix32.encode(digest.file_sha256)}, its name says {file_hash}"
                )
            kept = digest.file_sha256 if keep else None
            blob = await self._run(functools.partial(writer.commit, stored_sha256=kept))
        stored_sha256 = blob.stored_sha256 or await self._stored_sha256(blob.blob_id)
        if stored_sha256 is None:
            raise StorageError(f"blob {blob.blob_id} vanished right after its commit")
        nar_hash = nix32.encode(digest.nar_sha256)
        # An uncompressed upload's name is its NarHash: the record answers for it.
        uploaded_as = file_hash if file_hash != nar_hash else None
        record = NarRecord(
            blob.blob_id,
            digest.nar_size,
            blob.stored_size,
            nix32.encode(stored_sha256),
            uploaded_as,
        )
        writes = [self._storage.put(keys.nar(cache.name, nar_hash), record.to_json())]
        if uploaded_as is not None:
            # Written side by side (each put waits for its fsync): a record whose name record
            # failed to appear only means a HEAD of that name finds nothing.
            alias = NarFileRecord(nar_hash, compression)
            writes.append(
                self._storage.put(keys.nar_file(cache.name, uploaded_as), alias.to_json())
            )
        await asyncio.gather(*writes)
        self._records.forget(cache.name, nar_hash)
        return record

    async def _stored_sha256(self, blob_id: str) -> bytes | None:
        """sha256 of a blob's bytes at rest, read back (``None`` when the blob is gone)."""
        reader = await self._storage.blob_open(blob_id)
        if reader is None:
            return None
        digest = hashlib.sha256()
        try:
            async for chunk in reader.chunks():
                await self._run(digest.update, chunk)
        finally:
            await reader.close()
        return digest.digest()

    async def nar_file(
        self, cache: CacheSettings, file_hash: str, compression: str
    ) -> NarRecord | None:
        """The NAR an upload named ``nar/<file_hash>.nar<ext of compression>`` stored, if this
        cache still holds it (what Nix asks with ``HEAD`` before uploading that file)."""
        key = keys.nar_file(cache.name, file_hash)
        data = await self._storage.get(key)
        if data is None:
            return None
        try:
            alias = NarFileRecord.from_json(data)
        except (StorageError, KeyError, TypeError):
            return None
        if not _named_alike(compression, alias.compression):
            return None
        record = await self.nar_record(cache, alias.nar_hash)
        if record is not None:
            self._touch(key)
        return record

    async def nar_record(
        self, cache: CacheSettings, nar_hash_nix32: str, *, serving: bool = False
    ) -> NarRecord | None:
        """The NAR's record; ``serving`` records a use (a client is downloading it) and may
        answer from the records remembered while serving."""
        key = keys.nar(cache.name, nar_hash_nix32)
        memo_key = (cache.name, nar_hash_nix32, "")
        data = self._records.get(memo_key)[1] if serving else None  # only found ones are kept
        remembered = data is not None
        if data is None:
            data = await self._storage.get(key)
            if data is None:
                return None
        try:
            record = NarRecord.from_json(data)
        except StorageError as exc:
            # Damaged at rest: missing, so the next upload of the NAR replaces it.
            log.error("NAR record %s of cache %s: %s", nar_hash_nix32, cache.name, exc)
            return None
        if serving:
            if not remembered:
                self._records.put(memo_key, data)
            self._touch(key)
        return record

    async def open_blob(self, blob_id: str) -> BlobReader | None:
        return await self._storage.blob_open(blob_id)

    async def checked_blob(self, record: NarRecord, reader: BlobReader) -> BlobReader | None:
        """``reader``'s blob, whose stored size is not ``record``'s, once known to hold the NAR
        (``None`` if it vanished meanwhile): a blob sent as stored, unchecked, of another size
        than the narinfo's FileSize is content stored again in another encoding or one damaged
        at rest (cut short, overwritten), which must not go out as a complete download. A
        :class:`StorageError` when it is damaged. Blobs found sound are remembered (by id and
        size), so each is decoded once per process."""
        known = (record.blob_id, reader.stored_size)
        if known in self._sound:
            return reader
        if not await is_sound(reader, record.nar_size, record.blob_id):
            raise StorageError(
                f"stored blob {record.blob_id} is damaged ({known[1]} bytes, its NAR record "
                f"says {record.stored_size}, and it does not decode to its content)"
            )
        if len(self._sound) >= MAX_SOURCES:
            self._sound.clear()
        self._sound.add(known)
        return await self.open_blob(record.blob_id)

    # -- narinfos ------------------------------------------------------------------------

    async def put_narinfo(
        self,
        cache: CacheSettings,
        store_hash: str,
        data: bytes,
        coding: str = "none",
        limit: int = 1024**2,
    ) -> NarInfo:
        """Verify an uploaded narinfo against this cache and store it. ``coding`` undoes the
        body's ``Content-Encoding``; the narinfo is at most ``limit`` bytes decoded."""
        data = decode_document(data, coding, limit)
        info = narinfo_format.parse(data)
        if info.store_path.hash != store_hash:
            raise VerificationFailed(
                f"StorePath {info.store_path.full} does not match the URL's hash {store_hash}"
            )
        if cache.trusted_upload_keys and not _signed_by_any(info, cache.trusted_upload_keys):
            raise VerificationFailed(
                "the narinfo carries no valid signature by a key this cache trusts for uploads "
                f"({', '.join(k.split(':', 1)[0] for k in cache.trusted_upload_keys)})"
            )
        nar_hash = _sha256_nix32(info.nar_hash)
        record = await self.nar_record(cache, nar_hash)
        if record is None:
            raise VerificationFailed(
                f"no NAR with NarHash sha256:{nar_hash} has been uploaded to this cache"
            )
        if record.nar_size != info.nar_size:
            raise VerificationFailed(
                f"NarSize {info.nar_size} does not match the uploaded NAR's {record.nar_size}"
            )
        if info.ca is not None:
            try:
                check_store_path(info.ca, info.store_path, info.references)
            except FormatError as exc:
                raise VerificationFailed(exc.message) from None
        await self._check_references(cache, info)
        own_key = cache.signing_key.name + ":"
        stored = replace(
            info,
            url=f"nar/{nar_hash}.nar{SERVED_EXTENSION}",
            compression="zstd",
            file_hash=NixHash("sha256", nix32.decode(record.file_hash))
            if record.file_hash
            else None,
            file_size=record.stored_size,
            sigs=tuple(dict.fromkeys(sig for sig in info.sigs if not sig.startswith(own_key))),
        )
        key = keys.narinfo(cache.name, store_hash)
        if len(stored.sigs) > MAX_SIGNATURES or not await self._storage.put_if_absent(
            key, narinfo_format.render(stored).encode()
        ):
            stored = await self._next_narinfo(cache, key, stored, limit)
        self._served.forget(cache.name, store_hash)
        return stored

    async def _next_narinfo(
        self, cache: CacheSettings, key: str, upload: NarInfo, limit: int
    ) -> NarInfo:
        """What stands under ``key``, where a narinfo was stored before ``upload`` came (module
        docstring): the stored one with the upload's signatures added if they agree, the stored
        one alone if not, the upload if the stored one is unreadable or its NAR gone."""
        data = await self._storage.get(key)
        try:
            held = parse_stored(data) if data is not None else None
        except FormatError:
            held = None
        if held is not None and not _same_contents(held, upload):
            if await self.nar_record(cache, _sha256_nix32(held.nar_hash)) is not None:
                log.warning(
                    "cache %s: kept the stored narinfo of %s (NarHash %s); an upload with other "
                    "contents (NarHash %s) was answered as stored and not kept",
                    cache.name,
                    held.store_path.full,
                    held.nar_hash.to_nix(),
                    upload.nar_hash.to_nix(),
                )
                return held
            held = None
        if held is None:
            _signatures((), upload.sigs)  # within the limit
        else:
            sigs = _signatures(held.sigs, upload.sigs)
            upload = replace(upload, sigs=sigs, deriver=upload.deriver or held.deriver)
        document = narinfo_format.render(upload).encode()
        if len(document) > limit:
            raise VerificationFailed(
                f"with the signatures it already had, this narinfo would be {len(document)} "
                f"bytes, more than the {limit} a narinfo may be"
            )
        await self._storage.put(key, document)
        return upload

    async def _check_references(self, cache: CacheSettings, info: NarInfo) -> None:
        """Every reference of ``info`` is itself or a path this cache holds, under that name
        (Nix asks for a reference by its hash and refuses a narinfo naming another path)."""
        own = info.store_path
        others = [ref for ref in info.references if ref.hash != own.hash]
        held = await asyncio.gather(
            *(self._storage.get(keys.narinfo(cache.name, ref.hash)) for ref in others)
        )
        missing = [ref.base for ref, data in zip(others, held, strict=True) if data is None]
        if missing:
            raise VerificationFailed(
                f"references not in this cache (upload them first): {_some(missing)}"
            )
        renamed = [
            f"{ref.base} (held as {found.base if found else 'an unreadable narinfo'})"
            for ref, data in zip(others, held, strict=True)
            if data is not None and (found := narinfo_format.stored_path_of(data)) != ref
        ]
        renamed += [f"{ref.base} (this path is {own.base})" for ref in info.references
                    if ref.hash == own.hash and ref != own]  # fmt: skip
        if renamed:
            raise VerificationFailed(
                f"references name paths this cache holds under another name: {_some(renamed)}"
            )

    def served_narinfo(self, cache: CacheSettings, store_hash: str) -> tuple[bool, bytes | None]:
        """``(known, body)`` from the memory of served narinfos alone (no I/O): ``known`` says
        whether it holds an answer; ``body`` None is a remembered miss. ``store_hash`` valid.
        A narinfo answered from here counts as used, as in :meth:`get_narinfo`."""
        return self.served_by(cache, self.served_keys(cache, store_hash))

    @staticmethod
    def served_keys(cache: CacheSettings, store_hash: str) -> ServedKeys:
        """What :meth:`served_by` looks ``store_hash`` (valid) up by in ``cache``: made once and
        used for as long as the same settings object stands for the cache."""
        return (cache.name, store_hash, cache.signing_key.to_string()), keys.narinfo(
            cache.name, store_hash
        )

    def served_by(self, cache: CacheSettings, served: ServedKeys) -> tuple[bool, bytes | None]:
        """:meth:`served_narinfo` by the keys :meth:`served_keys` made for it."""
        memo_key, use_key = served
        known, body, due = self._served.lookup(memo_key)
        if due:
            self._refresh(cache, memo_key)
        if body is not None:
            self._touch(use_key)
        return known, body

    def served_hold(self, served: ServedKeys) -> tuple[Entry, float] | None:
        """The served-narinfo memory's entry for a narinfo it holds, and the seconds it may be
        answered from without asking :meth:`served_by` again, while it stays current
        (:meth:`ServedCache.hold <larder.core.servedcache.ServedCache.hold>`)."""
        return self._served.hold(served[0])

    def served_unchanged(self, entry: Entry) -> bool:
        """Whether no process of this server stored the narinfo of a held ``entry`` again."""
        return self._served.unchanged(entry)

    async def get_narinfo(self, cache: CacheSettings, store_hash: str) -> bytes | None:
        """The narinfo as served (signed by the cache), or ``None``."""
        memo_key = (cache.name, check_hash_part(store_hash), cache.signing_key.to_string())
        known, body, due = self._served.lookup(memo_key)
        if not known:
            mark = self._served.mark(memo_key)
            body = await self._render_narinfo(cache, memo_key)
            self._served.put(memo_key, body, mark)
        elif due:
            self._refresh(cache, memo_key)
        if body is not None:
            self._touch(keys.narinfo(cache.name, store_hash))
        return body

    def _refresh(self, cache: CacheSettings, memo_key: tuple[str, str, str]) -> None:
        """Look a remembered narinfo that is about to expire up again, in the background (once
        at a time)."""
        if memo_key not in self._refreshing:
            task = asyncio.get_running_loop().create_task(self._reread(cache, memo_key))
            self._refreshing[memo_key] = task

    async def _reread(self, cache: CacheSettings, memo_key: tuple[str, str, str]) -> None:
        try:
            mark = self._served.mark(memo_key)
            body = await self._render_narinfo(cache, memo_key)
            if self._served.mark(memo_key) == mark:  # else it was stored meanwhile: let it go
                self._served.put(memo_key, body, mark)
        except LarderError:
            pass  # the entry expires; the next request looks it up and answers the error
        finally:
            del self._refreshing[memo_key]

    async def _render_narinfo(
        self, cache: CacheSettings, memo_key: tuple[str, str, str]
    ) -> bytes | None:
        """The stored narinfo signed by the cache (``memo_key``: cache, store hash, key)."""
        store_hash = memo_key[1]
        data = await self._storage.get(keys.narinfo(cache.name, store_hash))
        if data is None:
            self._sources.pop(memo_key, None)
            return None
        source = self._sources.get(memo_key)
        if source is not None and source[0] == data:
            return source[1]
        try:
            info = parse_stored(data)
        except FormatError as exc:
            # Damaged at rest (or a CA stored before larder checked it): served as missing,
            # so Nix builds or uploads the path again and the upload's narinfo replaces it.
            log.error("stored narinfo %s of cache %s is corrupt: %s", store_hash, cache.name, exc)
            self._sources.pop(memo_key, None)
            return None
        if info.file_hash is None:  # stored before larder kept FileHash: Nix needs one
            info = await self._with_file_hash(cache, info)
        sig = cache.signing_key.sign(narinfo_format.fingerprint(info))
        body = narinfo_format.render(replace(info, sigs=(*info.sigs, sig))).encode()
        if len(self._sources) >= MAX_SOURCES:
            self._sources.clear()
        self._sources[memo_key] = (data, body)
        return body

    async def _with_file_hash(self, cache: CacheSettings, info: NarInfo) -> NarInfo:
        """``info`` with the FileHash of the NAR it points at (read back from the blob when the
        NAR record predates FileHash), or as it is when the NAR is gone."""
        if info.nar_hash.algo != "sha256":
            return info
        record = await self.nar_record(cache, info.nar_hash.nix32())
        if record is None:
            return info
        if record.file_hash is not None:
            digest: bytes | None = nix32.decode(record.file_hash)
        else:
            digest = await self._stored_sha256(record.blob_id)
            if digest is not None:
                await self._keep_file_hash(cache, info.nar_hash.nix32(), record, digest)
        if digest is None:
            return info
        return replace(info, file_hash=NixHash("sha256", digest), file_size=record.stored_size)

    async def _keep_file_hash(
        self, cache: CacheSettings, nar_hash: str, record: NarRecord, digest: bytes
    ) -> None:
        """Write the FileHash just read back into the NAR record, so the blob is read once,
        not by every lookup of every process (a 300 MB NAR took a second each time). Only if
        the record is as it was and the blob still has its recorded size: a record replaced
        or deleted (a collection) meanwhile is left as it is now."""
        key = keys.nar(cache.name, nar_hash)
        try:
            current = await self._storage.get(key)
            if current is None or NarRecord.from_json(current) != record:
                return
            if await self._storage.blob_stored_size(record.blob_id) != record.stored_size:
                return
            kept = replace(record, file_hash=nix32.encode(digest))
            await self._storage.put(key, kept.to_json())
        except StorageError as exc:  # served all the same; read back again next time
            log.warning("cannot keep the FileHash of NAR %s in %s: %s", nar_hash, cache.name, exc)
            return
        self._records.forget(cache.name, nar_hash)

    # -- opaque extras -------------------------------------------------------------------

    async def put_file(
        self,
        cache: CacheSettings,
        path: str,
        body: AsyncIterable[bytes],
        content_type: str,
        coding: str = "none",
        limit: int | None = None,
    ) -> FileRecord:
        """Store an opaque object Nix uploads next to narinfos, streaming it into a blob.

        ``coding`` undoes the body's ``Content-Encoding``: the object is stored decoded (at most
        ``limit`` bytes) and served without one. A ``debuginfo/<build-id>`` document is at most
        :data:`MAX_DEBUGINFO` bytes (:meth:`debuginfo` serves it).
        """
        check_object_path(path)
        if path.startswith("debuginfo/"):
            body = await self._debuginfo(body, coding)
            coding = "none"
        blob = await self._blobs.store(body, coding=coding, limit=limit)
        record = FileRecord(blob.blob_id, blob.size, content_type, "", blob.stored_size)
        await self._storage.put(keys.extra_file(cache.name, path), record.to_json())
        return record

    async def _debuginfo(self, body: AsyncIterable[bytes], coding: str) -> AsyncIterator[bytes]:
        """A ``debuginfo/`` document read whole and decoded (at most :data:`MAX_DEBUGINFO`)."""
        sent = bytearray()
        async for chunk in body:
            sent += chunk
            if len(sent) > MAX_DEBUGINFO:
                raise TooLarge(f"a debuginfo document is at most {MAX_DEBUGINFO} bytes")
        return _one(decode_document(bytes(sent), coding, MAX_DEBUGINFO))

    async def debuginfo(self, cache: CacheSettings, record: FileRecord) -> bytes | None:
        """A stored ``debuginfo/<build-id>`` document as served: its ``archive``
        (``../nar/<FileHash>.nar<ext>``, the name Nix uploads the NAR under, right after this
        document) becomes ``../nar/<NarHash>.nar.zst`` once this cache holds that upload; a
        document of another shape is served as it is. ``None`` when its blob is gone."""
        reader = await self.open_blob(record.blob_id)
        if reader is None:
            return None
        data = b"".join(
            [piece async for piece in decompressed(reader, record.size, record.blob_id)]
        )
        return await self._rewrite_debuginfo(cache, data)

    async def _rewrite_debuginfo(self, cache: CacheSettings, data: bytes) -> bytes:
        try:
            doc = json.loads(data)
            archive = doc["archive"]
            name = archive.removeprefix("../nar/")
            file_hash, compression = parse_nar_name(name)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            return data  # not the document Nix writes (or nested past reading): as it is
        key = keys.nar_file(cache.name, file_hash)
        alias_data = await self._storage.get(key)
        if alias_data is None or name == archive:
            return data
        try:
            alias = NarFileRecord.from_json(alias_data)
        except (StorageError, KeyError, TypeError):
            return data
        if not _named_alike(compression, alias.compression):
            return data
        doc["archive"] = f"../nar/{alias.nar_hash}.nar{SERVED_EXTENSION}"
        return json.dumps(doc).encode()

    async def file_record(self, cache: CacheSettings, path: str) -> FileRecord | None:
        key = keys.extra_file(cache.name, check_object_path(path))
        data = await self._storage.get(key)
        if data is None:
            return None
        try:
            record = FileRecord.from_json(data)
        except StorageError as exc:
            # Damaged at rest: missing, so the next upload replaces it.
            log.error("record of %s in cache %s: %s", path, cache.name, exc)
            return None
        self._touch(key)
        return record

    async def close(self) -> None:
        """Wait for the narinfo refreshes under way (the service is stopping)."""
        while self._refreshing:
            await asyncio.gather(*self._refreshing.values(), return_exceptions=True)

    def forget(self, key: str) -> None:
        """Drop what this replica remembers of a deleted narinfo or NAR record (``key`` is its
        storage key)."""
        split = keys.cache_of(key)
        if split is not None and split[1].startswith("narinfo/"):
            self._served.forget(split[0], split[1].removeprefix("narinfo/"))
        elif split is not None and split[1].startswith("nar/"):
            self._records.forget(split[0], split[1].removeprefix("nar/"))


def _some(items: list[str]) -> str:
    """The first five of ``items``, and how many more."""
    more = f" and {len(items) - 5} more" if len(items) > 5 else ""
    return ", ".join(items[:5]) + more


def _named_alike(named: str, uploaded: str) -> bool:
    """Whether a NAR file name in ``named``'s extension is the name an upload recorded in
    ``uploaded`` went under (a gzip NAR is named ``.nar``, as an uncompressed one is)."""
    return named == uploaded or (named, uploaded) == ("none", "gzip")


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


def parse_stored(data: bytes) -> NarInfo:
    """A stored narinfo as it may be served: it parses, and its ``CA``, if any, makes its store
    path (one stored before larder checked that is damaged: Nix aborts on it)."""
    info = narinfo_format.parse(data)
    if info.ca is not None:
        check_store_path(info.ca, info.store_path, info.references)
    return info


def _signatures(held: tuple[str, ...], added: tuple[str, ...]) -> tuple[str, ...]:
    """``held`` with the signatures of ``added`` it lacks after it; :class:`VerificationFailed`
    when that makes more than :data:`MAX_SIGNATURES` and more than ``held`` (a narinfo stored
    with more before the limit takes its own signatures again)."""
    merged = tuple(dict.fromkeys((*held, *added)))
    if len(merged) > max(MAX_SIGNATURES, len(held)):
        raise VerificationFailed(
            f"a narinfo may carry at most {MAX_SIGNATURES} signatures, "
            f"this one would carry {len(merged)}"
        )
    return merged


def _same_contents(a: NarInfo, b: NarInfo) -> bool:
    """Whether two narinfos describe the same store object (what signatures cover, and CA)."""
    return (
        a.store_path == b.store_path
        and a.nar_hash.digest == b.nar_hash.digest
        and a.nar_size == b.nar_size
        and set(a.references) == set(b.references)
        and a.ca == b.ca
    )


def _signed_by_any(info: NarInfo, trusted: tuple[str, ...]) -> bool:
    fingerprint = narinfo_format.fingerprint(info)
    keys_ = [PublicKey.parse(key) for key in trusted]
    return any(key.verify(fingerprint, sig) for key in keys_ for sig in info.sigs)


def _sha256_nix32(value: NixHash) -> str:
    if value.algo != "sha256":
        raise VerificationFailed(f"NarHash must be sha256, not {value.algo}")
    return value.nix32()
