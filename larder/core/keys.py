"""Where each kind of object lives in the object store (one place for the whole layout).

::

    config/token-secret                     HS256 secret for tokens (hex), created once
    config/token-secret-mounted             marker: servers use a mounted secret (JSON: fingerprint)
    config/revoked/<token id>               revocation marker (JSON: when, why)
    config/caches/<cache>.json              cache settings and its ed25519 signing key
    config/pins/<cache>/<store hash>        pinned store path (JSON: path, when, note)
    caches/<cache>/narinfo/<store hash>     narinfo as served, minus larder's own signature
    caches/<cache>/nar/<narhash nix32>      NAR record (JSON: blob id, NarSize, stored size)
    caches/<cache>/file/<path>              opaque Nix extra (JSON: blob id, size, type, encoding)
    caches/<cache>/rustc/manifest/<key>     rustc compilation manifest (JSON, see protocol.rustc)
    caches/<cache>/rustc/blob/<blob id>     marker: this cache holds the blob (JSON: size)
    caches/<cache>/rustc/direct/<dkey>/<id> direct entry: files and variables a dep-info named
    caches/<cache>/rustc/inputs/<key>       a manifest's key inputs (protocol.inputs, stored form)
    caches/<cache>/rustc/crate/<id>/<key>   index: keys stored for one crate identity (empty)
    caches/<cache>/sccache/<path>           sccache WebDAV entry (JSON: blob id, size, time)
    gc/lock                                 the running collection's lease (JSON: owner, since)
    gc/last-run                             the last finished collection's report (JSON)
    gc/clock/<owner>                        written and deleted to read the store's clock
    gc/use/<cache>/<ms>-<writer>            a batch of recorded uses (JSON: key -> POSIX time)
    gc/use-index/<cache>                    every recorded use, compacted by the collector

Keys below ``caches/<cache>/`` are a cache's content; the collector judges only those (and the
blobs they hold) and never touches ``config/``.
"""

from __future__ import annotations

TOKEN_SECRET = "config/token-secret"
TOKEN_SECRET_MOUNTED = "config/token-secret-mounted"
REVOKED_PREFIX = "config/revoked/"
CACHE_CONFIG_PREFIX = "config/caches/"
PINS_PREFIX = "config/pins/"
GC_LOCK = "gc/lock"
GC_LAST_RUN = "gc/last-run"
GC_CLOCK_PREFIX = "gc/clock/"
USE_PREFIX = "gc/use/"
USE_INDEX_PREFIX = "gc/use-index/"


def revoked(token_id: str) -> str:
    return f"{REVOKED_PREFIX}{token_id}"


def cache_config(cache: str) -> str:
    return f"{CACHE_CONFIG_PREFIX}{cache}.json"


def cache_prefix(cache: str) -> str:
    """Every key of one cache's content starts with this."""
    return f"caches/{cache}/"


def narinfo(cache: str, store_hash: str) -> str:
    return f"caches/{cache}/narinfo/{store_hash}"


def narinfo_prefix(cache: str) -> str:
    return f"caches/{cache}/narinfo/"


def nar(cache: str, nar_hash_nix32: str) -> str:
    return f"caches/{cache}/nar/{nar_hash_nix32}"


def nar_file(cache: str, file_hash_nix32: str) -> str:
    """The NAR an upload arrived as ``nar/<FileHash>.nar.<ext>``: its NarHash and compression."""
    return f"caches/{cache}/nar-file/{file_hash_nix32}"


def extra_file(cache: str, path: str) -> str:
    return f"caches/{cache}/file/{path}"


def rustc_manifest(cache: str, key: str) -> str:
    return f"caches/{cache}/rustc/manifest/{key}"


def rustc_blob(cache: str, blob_id: str) -> str:
    return f"caches/{cache}/rustc/blob/{blob_id}"


def rustc_direct_prefix(cache: str, direct_key: str) -> str:
    return f"caches/{cache}/rustc/direct/{direct_key}/"


def rustc_direct(cache: str, direct_key: str, entry_id: str) -> str:
    return f"{rustc_direct_prefix(cache, direct_key)}{entry_id}"


def rustc_inputs(cache: str, key: str) -> str:
    return f"caches/{cache}/rustc/inputs/{key}"


def rustc_crate_prefix(cache: str, identity_id: str) -> str:
    return f"caches/{cache}/rustc/crate/{identity_id}/"


def rustc_crate(cache: str, identity_id: str, key: str) -> str:
    return f"{rustc_crate_prefix(cache, identity_id)}{key}"


def sccache_entry(cache: str, path: str) -> str:
    return f"caches/{cache}/sccache/{path}"


def sccache_prefix(cache: str, path: str) -> str:
    """Keys of entries below collection ``path`` ("" for the root)."""
    return f"caches/{cache}/sccache/{path + '/' if path else ''}"


def cache_of(key: str) -> tuple[str, str] | None:
    """``(cache, key below the cache's prefix)`` for a key of a cache's content, else None."""
    top, cache, rest = [*key.split("/", 2), "", ""][:3]
    if top != "caches" or not cache or not rest:
        return None
    return cache, rest


def pin(cache: str, store_hash: str) -> str:
    return f"{PINS_PREFIX}{cache}/{store_hash}"


def pins_prefix(cache: str) -> str:
    return f"{PINS_PREFIX}{cache}/"


def use_batch_prefix(cache: str) -> str:
    return f"{USE_PREFIX}{cache}/"


def use_index(cache: str) -> str:
    return f"{USE_INDEX_PREFIX}{cache}"
