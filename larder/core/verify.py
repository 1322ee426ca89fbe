"""Checking a store at rest (``larder verify``): what every cache would serve is what was uploaded.

One run lists every cache's objects and every blob (:func:`larder.core.gc.graph.read_snapshot`),
then finds:

* a blob that does not decode, decodes to content whose BLAKE3 is not its id, or has bytes past
  its zstd stream; a blob an object holds that is not stored at all;
* an object that no longer parses (``corrupt``), or that records another size for its blob than
  the blob decodes to (NAR and file records, sccache entries, rustc manifests);
* an object that needs one of those: the holders of a damaged blob, a narinfo whose NAR record
  is damaged or missing, a manifest whose output marker is.

Nothing changes unless ``repair`` is given. Repair deletes each object found, referrers first,
with what it alone leads to (a NAR record's upload name, a manifest's inputs document and index
entry), then the damaged blobs: so the path or compilation is *missing*, and the next upload
stores it again (Nix uploads a path only when its narinfo is missing, so a narinfo left in place
would keep a damaged NAR served for ever). Every delete is conditional on the modification time
the listing saw, as the collector's are: whatever was written again meanwhile stays. A running
server may still answer a deleted narinfo from memory for up to its ``refresh_interval``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

from larder.core import keys
from larder.core.blobs import decompressed
from larder.core.concurrency import bounded_map
from larder.core.gc.graph import Entry, Snapshot, read_snapshot
from larder.core.nixcache import FileRecord, NarRecord
from larder.core.sccache import Entry as SccacheEntry
from larder.errors import FormatError, StorageError, StorageUnavailable
from larder.protocol.rustc import parse_manifest
from larder.storage.base import Storage, StoredBlob

#: Blobs decoded at once (decoding is CPU-bound; more only overlaps the storage's latency).
DEFAULT_CONCURRENCY = 4
# Records read again at once, for the sizes they state (the listing keeps none).
_READ_CONCURRENCY = 32
# Conditional deletes compare with the time the listing saw, plus this much for float rounding.
_SAME_TIME = 1e-3
# Object kinds whose record states the decoded size of the blob(s) it names.
_SIZED_KINDS = ("nar", "nix_file", "sccache_entry", "rustc_manifest")
# Kinds removed with an object, because nothing else leads to them.
_OWNED_KINDS = ("nar_file", "rustc_inputs", "rustc_crate")


@dataclass
class Verification:
    """What one run checked and found."""

    repaired: bool
    blobs: int = 0  # stored blobs read (sound or damaged)
    stored_bytes: int = 0  # their bytes at rest
    decoded_bytes: int = 0  # what the sound ones decode to
    objects: int = 0  # objects listed
    seconds: float = 0.0
    damaged_blobs: dict[str, str] = field(default_factory=dict)  # blob id -> why
    damaged_objects: dict[str, str] = field(default_factory=dict)  # storage key -> why
    #: Narinfos served whole whose closure is not: a reference is missing or damaged. Left in
    #: place (a push of the closure uploads the reference again); removing them would take
    #: every path that depends on them along.
    incomplete: dict[str, str] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)  # keys, and ``blob <id>`` for blobs

    @property
    def kept_urls(self) -> list[str]:
        """The URLs of the removed NARs that a caching proxy may keep for a year (larder's own
        ``/<cache>/nar/<NarHash>.nar.zst``, public and immutable): purge them there."""
        urls = []
        for key in self.removed:
            parts = key.split("/")
            if len(parts) == 4 and parts[0] == "caches" and parts[2] == "nar":
                urls.append(f"/{parts[1]}/nar/{parts[3]}.nar.zst")
        return sorted(urls)

    @property
    def sound(self) -> bool:
        return not self.damaged_blobs and not self.damaged_objects and not self.incomplete

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    def render(self) -> str:
        """A human-readable summary."""
        lines = [
            f"checked {self.blobs:,} blobs ({self.stored_bytes:,} B at rest, "
            f"{self.decoded_bytes:,} B decoded) and {self.objects:,} objects "
            f"in {self.seconds:.1f} s"
        ]
        if self.sound:
            lines.append("everything is sound")
            return "\n".join(lines)
        lines.append(
            f"damaged: {len(self.damaged_blobs):,} blobs, {len(self.damaged_objects):,} objects"
        )
        lines += [f"  blob {blob}: {why}" for blob, why in sorted(self.damaged_blobs.items())]
        lines += [f"  {key}: {why}" for key, why in sorted(self.damaged_objects.items())]
        if self.incomplete:
            lines.append(
                f"incomplete closures: {len(self.incomplete):,} narinfos (kept; pushing their "
                "closure again, from a runner that does not remember the reference, completes "
                "them)"
            )
            lines += [f"  {key}: {why}" for key, why in sorted(self.incomplete.items())]
        if self.damaged_blobs or self.damaged_objects:
            lines.append(
                f"removed {len(self.removed):,} (uploads store them again; anything written "
                "since the check began was kept)"
                if self.repaired
                else "nothing changed: `larder verify --repair` removes the damaged ones"
            )
        if self.kept_urls:
            lines.append(
                "a caching proxy in front keeps these for a year; purge them there (paths under "
                "the server's URL):"
            )
            lines += [f"  {url}" for url in self.kept_urls]
        return "\n".join(lines)


async def verify(
    storage: Storage,
    caches: Iterable[str],
    *,
    repair: bool = False,
    concurrency: int = DEFAULT_CONCURRENCY,
    clock: Callable[[], float] = time.time,
) -> Verification:
    """Check every blob and the objects of ``caches`` (see the module); remove what is damaged
    when ``repair``. Storage failing meanwhile raises :class:`StorageUnavailable`."""
    began = time.monotonic()
    report = Verification(repaired=repair)
    snapshot = await read_snapshot(storage, caches, clock=clock())
    report.objects = len(snapshot.entries)
    sizes = await _decoded_sizes(storage, snapshot, report, concurrency)
    await _check_objects(storage, snapshot, sizes, report)
    if repair:
        await _remove(storage, snapshot, report)
    report.seconds = time.monotonic() - began
    return report


async def _decoded_sizes(
    storage: Storage, snapshot: Snapshot, report: Verification, concurrency: int
) -> dict[str, int]:
    """Each sound blob's decoded size; damaged and missing ones go to the report."""

    async def decode(blob: StoredBlob) -> tuple[str, int | None, str]:
        reader = await storage.blob_open(blob.blob_id)
        if reader is None:
            return blob.blob_id, None, ""  # deleted since the listing (reaped): not judged
        produced = 0
        try:
            async for piece in decompressed(reader, None, blob.blob_id):
                produced += len(piece)
        except StorageUnavailable:
            raise
        except StorageError as exc:
            if await storage.blob_stored_size(blob.blob_id) is None:
                return blob.blob_id, None, ""  # deleted while read (S3 reads after the open)
            return blob.blob_id, None, str(exc)
        return blob.blob_id, produced, ""

    sizes: dict[str, int] = {}
    vanished: set[str] = set()
    for blob_id, size, why in await bounded_map(decode, snapshot.blobs.values(), concurrency):
        if not why and size is None:
            vanished.add(blob_id)  # gone meanwhile: missing if a holder is still there
            continue
        report.blobs += 1
        report.stored_bytes += snapshot.blobs[blob_id].stored_size
        if why:
            report.damaged_blobs[blob_id] = why
        elif size is not None:
            sizes[blob_id] = size
            report.decoded_bytes += size
    for key, entry in snapshot.entries.items():
        blob = entry.blob
        if blob is None or blob in report.damaged_blobs:
            continue
        if blob in snapshot.blobs and blob not in vanished:
            continue
        # A collection may have deleted the holder, then the blob, since the listing: missing
        # only if the holder is still there and the blob still is not.
        if await storage.exists(key) and await storage.blob_stored_size(blob) is None:
            report.damaged_blobs[blob] = "missing: not stored, yet an object holds it"
    return sizes


async def _check_objects(
    storage: Storage, snapshot: Snapshot, sizes: dict[str, int], report: Verification
) -> None:
    """Objects that cannot be served: corrupt, holding a damaged blob, recording another size,
    or needing such an object (or a missing one)."""
    damaged = report.damaged_objects
    sized = []
    for key, entry in snapshot.entries.items():
        if entry.corrupt:
            damaged[key] = "does not parse"
        elif entry.blob in report.damaged_blobs:
            damaged[key] = f"its blob {entry.blob} is damaged"
        elif entry.kind in _SIZED_KINDS:
            sized.append((key, entry))

    async def size_check(item: tuple[str, Entry]) -> tuple[str, str]:
        return item[0], await _size_disagrees(storage, item[0], item[1], sizes)

    for key, why in await bounded_map(size_check, sized, _READ_CONCURRENCY):
        if why:
            damaged[key] = why
    for key, entry in snapshot.entries.items():
        if key in damaged or entry.kind not in ("narinfo", "rustc_manifest"):
            continue
        for ref in entry.refs:
            if not _needed(entry.kind, ref):
                continue
            if ref in damaged:
                state = "damaged"
            elif ref in snapshot.entries or not await _still_missing(storage, key, ref):
                continue
            else:
                state = "missing"
            what = "NAR record" if entry.kind == "narinfo" else "output"
            damaged[key] = f"its {what} {ref} is {state}"
            break
    for key, entry in snapshot.entries.items():
        if key in damaged or entry.kind != "narinfo":
            continue
        for ref in entry.refs:
            if not _relative(ref).startswith("narinfo/"):
                continue
            if ref in damaged:
                report.incomplete[key] = f"its reference {ref} is damaged"
            elif ref not in snapshot.entries and await _still_missing(storage, key, ref):
                report.incomplete[key] = f"its reference {ref} is missing"


async def _still_missing(storage: Storage, key: str, ref: str) -> bool:
    """Whether ``key`` is still stored and ``ref`` still is not (both were so when listed; a
    collection deletes referrers first, so both may have gone since)."""
    return await storage.exists(key) and not await storage.exists(ref)


def _needed(kind: str, ref: str) -> bool:
    """Whether an object of ``kind`` cannot be served without ``ref`` (a narinfo's references
    and listing, a manifest's inputs document, may be absent)."""
    rel = _relative(ref)
    return rel.startswith("nar/") if kind == "narinfo" else rel.startswith("rustc/blob/")


def _relative(key: str) -> str:
    """``key`` below its cache's prefix (``""`` for a key of no cache)."""
    return (keys.cache_of(key) or ("", ""))[1]


async def _size_disagrees(storage: Storage, key: str, entry: Entry, sizes: dict[str, int]) -> str:
    """Why the sizes ``key`` records disagree with its blobs' decoded sizes, or ``""``."""
    data = await storage.get(key)
    if data is None:
        return ""  # deleted since the listing
    try:
        if entry.kind == "nar":
            record = NarRecord.from_json(data)
            recorded = [(record.blob_id, record.nar_size)]
        elif entry.kind == "nix_file":
            file = FileRecord.from_json(data)
            recorded = [(file.blob_id, file.size)]
        elif entry.kind == "sccache_entry":
            stored = SccacheEntry.from_json(data)
            recorded = [(stored.blob_id, stored.size)]
        else:
            manifest = parse_manifest(data)
            manifest.printed()  # version 2's text decodes, within its bound, as clients need
            recorded = [(o.blake3, o.size) for o in manifest.outputs]
    except (FormatError, StorageError):
        return "does not parse"
    for blob_id, size in recorded:
        actual = sizes.get(blob_id)
        if actual is not None and actual != size:
            return f"records {size:,} B for blob {blob_id}, which decodes to {actual:,} B"
    return ""


async def _remove(storage: Storage, snapshot: Snapshot, report: Verification) -> None:
    """Delete what the report found: referrers, then what they hold, then what only they led
    to, then the blobs; each only if not written since the listing."""
    found = report.damaged_objects
    referrers = [k for k in found if snapshot.entries[k].kind in ("narinfo", "rustc_manifest")]
    holders = [k for k in found if k not in referrers]
    owned = _owned(snapshot, found)  # a manifest's inputs document, then its index entry
    owned |= _owned(snapshot, owned)
    for key in [*sorted(referrers), *sorted(holders), *sorted(owned - set(found))]:
        if await storage.delete_if_older(key, snapshot.entries[key].modified + _SAME_TIME):
            report.removed.append(key)
    for blob_id in sorted(report.damaged_blobs):
        blob = snapshot.blobs.get(blob_id)
        if blob is None:
            continue  # missing: nothing to delete
        if await storage.blob_delete_if_older(blob_id, blob.modified + _SAME_TIME):
            report.removed.append(f"blob {blob_id}")


def _owned(snapshot: Snapshot, objects: Iterable[str]) -> set[str]:
    """What ``objects`` refer to that nothing else leads to (:data:`_OWNED_KINDS`)."""
    entries = snapshot.entries
    return {
        ref
        for key in objects
        for ref in entries[key].refs
        if ref in entries and entries[ref].kind in _OWNED_KINDS
    }
