"""What a cache holds, as the collector sees it: every object with its size, age, references and
blob.

=================  =========================  ==============================================
kind               key below caches/<cache>/  refers to / holds
=================  =========================  ==============================================
narinfo            ``narinfo/<hash>``         the narinfos of its references, its NAR record,
                                              its ``<hash>.ls`` listing (when there is one)
nar                ``nar/<NarHash>``          holds the NAR's blob; the name of the upload
                                              that brought it (``nar-file/``), if compressed
nar_file           ``nar-file/<FileHash>``    the NAR record it names (an upload's file hash)
nix_file           ``file/<path>``            holds a blob (``.ls``, ``log/``, realisations)
rustc_manifest     ``rustc/manifest/<key>``   the blob markers of its outputs, its inputs
                                              document (``rustc/inputs/<key>``), if any
rustc_blob         ``rustc/blob/<id>``        holds blob ``<id>`` (the marker names it)
rustc_direct       ``rustc/direct/<k>/<id>``  nothing (a small document)
rustc_inputs       ``rustc/inputs/<key>``     its crate index entry (``rustc/crate/<id>/<key>``,
                                              the id from the document's header)
rustc_crate        ``rustc/crate/<id>/<key>`` nothing (an empty index entry)
sccache_entry      ``sccache/<path>``         holds a blob
=================  =========================  ==============================================

Reading costs one listing per kind and cache, plus one read of each narinfo, NAR record, Nix
extra, manifest and sccache entry. :func:`scan` re-reads only objects whose size or modification
time differ from what it was given, so a long-running service that keeps the previous result
pays for the listings and what changed. An object that does not parse (a narinfo whose ``CA`` does
not make its store path included) is kept as a node with no references (``corrupt``), never
guessed at.
"""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field

from larder.core import keys
from larder.core.concurrency import bounded_map
from larder.core.nixcache import FileRecord, NarRecord, parse_stored
from larder.core.sccache import Entry as SccacheEntry
from larder.errors import FormatError, StorageError
from larder.protocol.inputs import stored_identity
from larder.protocol.rustc import parse_manifest
from larder.storage.base import ObjectInfo, Storage, StoredBlob, check_blob_id

# kind -> key prefix below caches/<cache>/, in listing order
KINDS: dict[str, str] = {
    "narinfo": "narinfo/",
    "nar": "nar/",
    "nar_file": "nar-file/",
    "nix_file": "file/",
    "rustc_manifest": "rustc/manifest/",
    "rustc_blob": "rustc/blob/",
    "rustc_direct": "rustc/direct/",
    "rustc_inputs": "rustc/inputs/",
    "rustc_crate": "rustc/crate/",
    "sccache_entry": "sccache/",
}
# Kinds whose objects refer to other objects: what a concurrent upload can make a new referrer of.
REFERRING_KINDS = ("narinfo", "rustc_manifest", "rustc_inputs")
_READ_CONCURRENCY = 32


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored object of a cache."""

    kind: str
    size: int  # bytes of the object itself
    modified: float  # backend time of its last write
    refs: tuple[str, ...] = ()  # storage keys of the objects it needs
    blob: str | None = None  # the blob it holds
    corrupt: bool = False


@dataclass
class Snapshot:
    """Every cache's objects and every committed blob, as listed from ``started`` on."""

    started: float  # caller's clock when the listing began
    entries: dict[str, Entry] = field(default_factory=dict)
    blobs: dict[str, StoredBlob] = field(default_factory=dict)

    def by_cache(self) -> dict[str, dict[str, Entry]]:
        """The entries grouped by cache (one pass)."""
        grouped: dict[str, dict[str, Entry]] = {}
        for key, entry in self.entries.items():
            split = keys.cache_of(key)
            if split is not None:
                grouped.setdefault(split[0], {})[key] = entry
        return grouped


def _facts(cache: str, kind: str, rel: str, data: bytes) -> tuple[tuple[str, ...], str | None]:
    """``(refs, blob)`` of an object from its bytes; raises on a corrupt object."""
    if kind == "narinfo":
        info = parse_stored(data)  # a CA that does not make its path: damaged, as Nix sees it
        own = info.store_path.hash
        # Interned: a popular dependency is named by thousands of narinfos, kept once.
        refs = [sys.intern(keys.narinfo(cache, r.hash)) for r in info.references if r.hash != own]
        if info.nar_hash.algo == "sha256":
            refs.append(keys.nar(cache, info.nar_hash.nix32()))
        refs.append(keys.extra_file(cache, f"{own}.ls"))
        return tuple(refs), None
    if kind == "nar":
        record = NarRecord.from_json(data)
        named = (keys.nar_file(cache, record.uploaded_as),) if record.uploaded_as else ()
        return named, record.blob_id
    if kind == "nar_file":
        return (), None
    if kind == "nix_file":
        return (), FileRecord.from_json(data).blob_id
    if kind == "rustc_manifest":
        # A manifest's inputs document goes with it (a manifest stored before documents were
        # kept refers to one that is not there, which the collector ignores).
        outputs = parse_manifest(data).outputs
        key = rel.rsplit("/", 1)[-1]
        refs = [*(keys.rustc_blob(cache, o.blake3) for o in outputs), keys.rustc_inputs(cache, key)]
        return tuple(dict.fromkeys(refs)), None
    if kind == "rustc_inputs":
        key = rel.rsplit("/", 1)[-1]
        return (keys.rustc_crate(cache, stored_identity(data), key),), None
    if kind == "sccache_entry":
        return (), SccacheEntry.from_json(data).blob_id
    raise ValueError(f"no facts to read for kind {kind}")


# Kinds whose facts are in their key: listed, never read.
_KEY_ONLY_KINDS = frozenset({"rustc_blob", "rustc_direct", "rustc_crate"})


def _facts_from_key(kind: str, rel: str) -> tuple[tuple[str, ...], str | None]:
    """Facts of a :data:`_KEY_ONLY_KINDS` object: a marker names its blob, a direct entry and
    a crate index entry refer to nothing."""
    if kind == "rustc_blob":
        return (), check_blob_id(rel.rsplit("/", 1)[-1])
    return (), None


def parse_entry(cache: str, kind: str, info: ObjectInfo, data: bytes | None) -> Entry:
    """The :class:`Entry` of a listed object (``data`` is its bytes, for kinds that are read)."""
    rel = info.key[len(keys.cache_prefix(cache)) :]
    try:
        if kind in _KEY_ONLY_KINDS:
            refs, blob = _facts_from_key(kind, rel)
        else:
            refs, blob = _facts(cache, kind, rel, data or b"")
    except (FormatError, StorageError, ValueError, KeyError, TypeError):
        return Entry(kind, info.size, info.modified, corrupt=True)
    return Entry(kind, info.size, info.modified, refs, blob)


async def scan(
    storage: Storage,
    cache: str,
    kinds: Iterable[str] = KINDS,
    known: Mapping[str, Entry] | None = None,
) -> AsyncIterator[tuple[str, Entry]]:
    """Every object of ``kinds`` in ``cache`` as ``(key, Entry)``, reading only objects that are
    not in ``known`` with the same size and modification time (those are yielded as known)."""
    known = known or {}

    async def read(item: tuple[str, ObjectInfo]) -> tuple[str, Entry] | None:
        kind, info = item
        data = await storage.get(info.key)
        if data is None:
            return None  # deleted since it was listed
        return sys.intern(info.key), parse_entry(cache, kind, info, data)

    async def read_all(batch: list[tuple[str, ObjectInfo]]) -> list[tuple[str, Entry]]:
        found = await bounded_map(read, batch, _READ_CONCURRENCY)
        return [item for item in found if item is not None]

    for kind in kinds:
        prefix = keys.cache_prefix(cache) + KINDS[kind]
        batch: list[tuple[str, ObjectInfo]] = []
        async for info in storage.object_infos(prefix):
            old = known.get(info.key)
            if old is not None and old.size == info.size and old.modified == info.modified:
                yield sys.intern(info.key), old
            elif kind in _KEY_ONLY_KINDS:
                yield sys.intern(info.key), parse_entry(cache, kind, info, None)
            else:
                batch.append((kind, info))
                if len(batch) >= 4 * _READ_CONCURRENCY:
                    for found in await read_all(batch):
                        yield found
                    batch = []
        for found in await read_all(batch):
            yield found


async def read_snapshot(
    storage: Storage,
    caches: Iterable[str],
    known: Mapping[str, Entry] | None = None,
    clock: float | None = None,
) -> Snapshot:
    """Every object of ``caches`` and every blob. Objects first: a blob committed after its
    listing is not in the snapshot, so it is never judged unreferenced by it."""
    snapshot = Snapshot(started=clock if clock is not None else time.time())
    for cache in caches:
        async for key, entry in scan(storage, cache, KINDS, known):
            snapshot.entries[key] = entry
    async for blob in storage.blob_infos():
        snapshot.blobs[blob.blob_id] = blob
    return snapshot


@dataclass
class Tally:
    """Objects of one kind and the bytes they take: their own plus the distinct blobs they hold."""

    objects: int = 0
    bytes: int = 0


def tally(
    entries: Iterable[Entry], blobs: Mapping[str, StoredBlob], kinds: Iterable[str] = KINDS
) -> dict[str, Tally]:
    """``kind -> Tally`` (every kind present, at 0 when empty)."""
    report = {kind: Tally() for kind in kinds}
    held: dict[str, set[str]] = {kind: set() for kind in report}
    for entry in entries:
        counted = report.setdefault(entry.kind, Tally())
        counted.objects += 1
        counted.bytes += entry.size
        if entry.blob is not None and entry.blob not in held.setdefault(entry.kind, set()):
            held[entry.kind].add(entry.blob)
            stored = blobs.get(entry.blob)
            counted.bytes += stored.stored_size if stored is not None else 0
    return report
