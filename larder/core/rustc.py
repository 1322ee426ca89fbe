"""Cached rustc compilations: content-addressed output blobs and manifests per cache key.

Rules:

* A blob is uploaded as ``blobs/<BLAKE3 of its bytes>``; the body must hash to that id or it is
  refused before it becomes visible. Identical bytes are stored once in the shared blob store,
  whichever cache (or protocol) uploaded them.
* A cache can read only the blobs it was given: an upload records a per-cache marker, and the
  missing-blob query answers from those markers. A client that never held the bytes therefore
  cannot read another cache's artifacts by guessing a hash, and must upload to prove it has them.
* A direct entry (which files and variables a compilation's dep-info run named) is stored under
  its direct key by content, so the same entry is kept once and different ones side by side.
* A manifest is accepted only when every blob it lists is held by this cache with the size the
  manifest states; until then it is refused (naming the missing blobs) and nothing is recorded.
* A key's inputs document (:mod:`larder.protocol.inputs`) is accepted only for a key this cache
  holds a manifest for, and is stored compressed under the key with an empty index entry under
  its crate identity, so the keys stored for one crate are one bounded listing. The server
  checks the document's shape, never its meaning: the client compares inputs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterable, Iterable

import blake3

from larder.core import keys
from larder.core.blobs import BlobStore, load_record
from larder.core.caches import CacheSettings
from larder.core.decoding import first_allowance
from larder.core.ingest import CodedBlobIngest, keeps_upload, peek
from larder.core.lastuse import Touch, ignore_use
from larder.errors import FormatError, VerificationFailed
from larder.protocol.inputs import (
    MAX_NEAREST,
    Identity,
    Nearest,
    pack_stored,
    parse_document,
    stored_identity,
    unpack_stored,
)
from larder.protocol.rustc import (
    MAX_DIRECT_ENTRIES,
    DirectEntry,
    Manifest,
    check_key,
    parse_direct_entry,
    parse_manifest,
)
from larder.storage.base import BlobReader

# Metadata lookups in flight at once for one missing-blob query.
_LOOKUP_CONCURRENCY = 32
# Index entries of one crate looked at for its nearest keys (the most recent are kept).
MAX_CRATE_LISTING = 4096
#: No limit on a blob's decoded size beyond the caller's own (``upload_blob``'s default).
UNLIMITED = 1 << 62


class RustcCache:
    """Artifact and manifest operations over one store."""

    def __init__(self, blobs: BlobStore, touch: Touch = ignore_use) -> None:
        self._blobs = blobs
        self._storage = blobs.storage
        self._touch = touch

    async def _held_size(
        self, cache: CacheSettings, blob_id: str, serving: bool = False
    ) -> int | None:
        """The size of ``blob_id`` if this cache holds it (marker and blob both present);
        ``serving`` records a use (a client is downloading it)."""
        key = keys.rustc_blob(cache.name, blob_id)
        marker = await self._storage.get(key)
        if marker is None or await self._storage.blob_stored_size(blob_id) is None:
            return None
        if serving:
            self._touch(key)
        return int(load_record(marker)["size"])

    async def missing(self, cache: CacheSettings, blob_ids: Iterable[str]) -> list[str]:
        """Those of ``blob_ids`` this cache does not hold, in the order given."""
        ids = list(dict.fromkeys(check_key(blob_id) for blob_id in blob_ids))
        gate = asyncio.Semaphore(_LOOKUP_CONCURRENCY)

        async def held(blob_id: str) -> bool:
            async with gate:
                return await self._held_size(cache, blob_id) is not None

        found = await asyncio.gather(*(held(blob_id) for blob_id in ids))
        return [blob_id for blob_id, present in zip(ids, found, strict=True) if not present]

    async def upload_blob(
        self,
        cache: CacheSettings,
        blob_id: str,
        body: AsyncIterable[bytes],
        coding: str = "none",
        max_size: int = UNLIMITED,
    ) -> int:
        """Store ``body`` if it hashes to ``blob_id`` once its ``coding`` (an HTTP content
        coding's decoder name) is undone, at most ``max_size`` bytes decoded; return its size.

        A zstd body is kept as it came (one decode checks it) when its windows are small enough
        (:func:`keeps_upload`); other bodies are decoded and stored in the store's own encoding.
        """
        check_key(blob_id)
        first, chunks = await peek(body)
        keep = keeps_upload(coding, first)
        async with (
            self._blobs.decoder_memory() as memory,
            self._blobs.writer(encoded=keep) as writer,
        ):
            allowance = first_allowance(memory)  # (a body without a coding has no decoder)
            ingest = CodedBlobIngest(coding, writer, max_size, keep=keep, allowance=allowance)
            try:
                async for chunk in chunks:
                    await self._blobs.decode(ingest.feed, ingest, chunk, memory)
                await self._blobs.run(ingest.finish)
            finally:
                ingest.close()
            info = await self._blobs.run(writer.commit, blob_id)
        marker = json.dumps({"size": info.size}).encode()
        await self._storage.put(keys.rustc_blob(cache.name, blob_id), marker)
        return info.size

    async def open_blob(self, cache: CacheSettings, blob_id: str) -> BlobReader | None:
        """The stored (zstd) bytes of a blob this cache holds, or None."""
        if await self._held_size(cache, check_key(blob_id), serving=True) is None:
            return None
        return await self._storage.blob_open(blob_id)

    async def put_manifest(self, cache: CacheSettings, key: str, data: bytes) -> Manifest:
        """Validate and store a manifest whose blobs this cache already holds."""
        check_key(key)
        manifest = parse_manifest(data)
        sizes = await asyncio.gather(
            *(self._held_size(cache, output.blake3) for output in manifest.outputs)
        )
        absent = [o.name for o, size in zip(manifest.outputs, sizes, strict=True) if size is None]
        if absent:
            raise VerificationFailed(
                f"manifest refers to blobs this cache does not hold (upload them first): "
                f"{', '.join(absent)}"
            )
        for output, size in zip(manifest.outputs, sizes, strict=True):
            if size != output.size:
                raise VerificationFailed(
                    f"output {output.name}: manifest says {output.size} bytes, blob has {size}"
                )
        await self._storage.put(keys.rustc_manifest(cache.name, key), manifest.to_json())
        return manifest

    async def put_direct(self, cache: CacheSettings, direct_key: str, data: bytes) -> str:
        """Record a direct entry under ``direct_key``; its id (the same entry is kept once)."""
        check_key(direct_key)
        document = parse_direct_entry(data).to_json()
        entry_id = blake3.blake3(document).hexdigest()
        await self._storage.put(keys.rustc_direct(cache.name, direct_key, entry_id), document)
        return entry_id

    async def get_direct(self, cache: CacheSettings, direct_key: str) -> list[DirectEntry]:
        """The entries recorded under ``direct_key`` (at most ``MAX_DIRECT_ENTRIES``)."""
        prefix = keys.rustc_direct_prefix(cache.name, check_key(direct_key))
        found: list[str] = []
        async for key in self._storage.keys(prefix):
            found.append(key)
            if len(found) == MAX_DIRECT_ENTRIES:
                break
        documents = await asyncio.gather(*(self._storage.get(key) for key in found))
        entries = []
        for key, document in zip(found, documents, strict=True):
            if document is not None:
                self._touch(key)
                try:
                    entries.append(parse_direct_entry(document))
                except FormatError:
                    continue  # written by an older format; never fatal for a lookup
        return entries

    async def get_manifest(self, cache: CacheSettings, key: str) -> bytes | None:
        """The stored manifest for ``key``, or None on a miss."""
        name = keys.rustc_manifest(cache.name, check_key(key))
        document = await self._storage.get(name)
        if document is not None:
            self._touch(name)
        return document

    async def put_inputs(self, cache: CacheSettings, key: str, data: bytes) -> Identity:
        """Store the inputs document of ``key``, whose manifest this cache holds."""
        check_key(key)
        document = parse_document(data)
        if await self._storage.get(keys.rustc_manifest(cache.name, key)) is None:
            raise VerificationFailed(
                f"no manifest for key {key[:16]}: upload it before its inputs document"
            )
        identity = document.identity
        earlier = await self._storage.get(keys.rustc_inputs(cache.name, key))
        await self._storage.put(keys.rustc_inputs(cache.name, key), pack_stored(document))
        await self._storage.put(keys.rustc_crate(cache.name, identity.id(), key), b"")
        if earlier is not None:  # the key no longer belongs to another crate's index
            with contextlib.suppress(FormatError):
                replaced = stored_identity(earlier)
                if replaced != identity.id():
                    await self._storage.delete(keys.rustc_crate(cache.name, replaced, key))
        return identity

    async def get_inputs(self, cache: CacheSettings, key: str) -> bytes | None:
        """The inputs document (JSON) of ``key``, or None. A read is not a use: looking a key
        up to explain a miss must not keep it."""
        stored = await self._storage.get(keys.rustc_inputs(cache.name, check_key(key)))
        if stored is None:
            return None
        try:
            return unpack_stored(stored)
        except FormatError:
            return None  # damaged at rest: as good as absent for an explanation

    async def nearest(self, cache: CacheSettings, identity: Identity) -> list[Nearest]:
        """The most recently stored keys of ``identity`` (at most ``MAX_NEAREST``), newest
        first, from at most ``MAX_CRATE_LISTING`` index entries."""
        prefix = keys.rustc_crate_prefix(cache.name, identity.id())
        found: list[Nearest] = []
        async for info in self._storage.object_infos(prefix):
            key = info.key[len(prefix) :]
            try:
                found.append(Nearest(check_key(key), int(info.modified)))
            except FormatError:
                continue
            if len(found) >= MAX_CRATE_LISTING:
                break
        found.sort(key=lambda item: (-item.stored, item.key))
        return found[:MAX_NEAREST]
