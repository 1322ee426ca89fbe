"""Pinned store paths: exempt from eviction, with their whole closure.

A pin is ``config/pins/<cache>/<store hash>`` (JSON: the path as given, when, a note). It names a
store path, not an upload, so a path can be pinned before it is pushed and the pin takes effect
when it arrives. Pins live in the object store, so every replica and ``larder gc`` see the same.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from larder.core import keys
from larder.core.blobs import load_record
from larder.errors import FormatError, StorageError
from larder.protocol.storepath import StorePath, check_hash_part
from larder.storage.base import Storage


@dataclass(frozen=True)
class Pin:
    store_hash: str
    path: str  # as given: a full store path, a base name or a bare hash
    pinned_at: float
    note: str = ""


def pin_target(text: str) -> tuple[str, str]:
    """``(store hash, path)`` from ``/nix/store/<hash>-<name>``, ``<hash>-<name>`` or ``<hash>``
    (a trailing ``.narinfo`` and ``/`` are ignored); :class:`FormatError` otherwise."""
    text = text.strip().removesuffix("/").removesuffix(".narinfo")
    if text.startswith("/"):
        path = StorePath.parse(text)
        return path.hash, path.full
    if "-" in text:
        path = StorePath.parse_base(text)
        return path.hash, path.full
    return check_hash_part(text), text


async def pin(storage: Storage, cache: str, text: str, note: str = "") -> Pin:
    store_hash, path = pin_target(text)
    found = Pin(store_hash, path, time.time(), note)
    document = {"path": path, "pinned_at": found.pinned_at, "note": note}
    await storage.put(keys.pin(cache, store_hash), json.dumps(document).encode())
    return found


async def unpin(storage: Storage, cache: str, text: str) -> bool:
    """Remove a pin; whether there was one."""
    store_hash, _ = pin_target(text)
    return await storage.delete(keys.pin(cache, store_hash))


async def pins(storage: Storage, cache: str) -> list[Pin]:
    """The cache's pins (a corrupt one still pins its hash)."""
    found = []
    prefix = keys.pins_prefix(cache)
    async for key in storage.keys(prefix):
        store_hash = key[len(prefix) :]
        try:
            check_hash_part(store_hash)
        except FormatError:
            continue
        data = await storage.get(key)
        try:
            doc = load_record(data) if data is not None else {}
            found.append(
                Pin(
                    store_hash,
                    str(doc.get("path", store_hash)),
                    float(doc.get("pinned_at", 0)),
                    str(doc.get("note", "")),
                )
            )
        except (StorageError, TypeError, ValueError):
            found.append(Pin(store_hash, store_hash, 0.0))
    return found
