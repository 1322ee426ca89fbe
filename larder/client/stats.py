"""Per-user counters of the shim, kept in ``stats.json`` in its state directory.

Every invocation adds its outcome under an exclusive ``flock`` on ``stats.lock``, so concurrent
invocations (``cargo -j``) never lose an update. ``--stats`` prints them, ``--zero-stats`` resets
them. Fields: ``hits``, ``misses``, ``non_cacheable`` (with ``non_cacheable_reasons``),
``errors`` (with ``error_kinds``, and ``last_errors``: the last error of each kind as it was
told, at most :data:`MAX_DETAIL` characters), ``misses`` by the category that explains them
(``miss_categories``: ``source``, ``dependency``... see :mod:`larder.client.explain`),
``uploads``, ``bytes_down``, ``bytes_up``, ``cache_ms`` (time spent on keys, lookups,
restores and uploads), ``compile_ms`` (time in rustc for misses and non-cacheable
compilations) and ``since`` (when the counters were last zeroed, Unix seconds).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import IO, Any

from larder.client.atomic import replace_with
from larder.client.probe import state_dir_name

COUNTERS = (
    "hits",
    "misses",
    "non_cacheable",
    "errors",
    "uploads",
    "bytes_down",
    "bytes_up",
    "cache_ms",
    "compile_ms",
)
BREAKDOWNS = ("non_cacheable_reasons", "error_kinds", "miss_categories")
#: The longest error detail kept in ``last_errors``.
MAX_DETAIL = 300


def empty() -> dict[str, Any]:
    stats: dict[str, Any] = dict.fromkeys(COUNTERS, 0)
    stats.update({name: {} for name in BREAKDOWNS})
    stats["last_errors"] = {}
    stats["since"] = int(time.time())
    return stats


def state_dir(environ: dict[str, str] | os._Environ[str]) -> Path:
    """``$LARDER_STATE_DIR``, else ``$XDG_CACHE_HOME/larder``, else ``~/.cache/larder``."""
    return Path(state_dir_name(environ))


class _Lock:
    """An exclusive ``flock`` held for a ``with`` block (closing the file releases it)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._file: IO[str] | None = None

    def __enter__(self) -> None:
        self._file = open(self._path, "a")
        fcntl.flock(self._file, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()


class Stats:
    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._file = directory / "stats.json"

    def _locked(self) -> _Lock:
        self._dir.mkdir(parents=True, exist_ok=True)
        return _Lock(self._dir / "stats.lock")

    def _load(self) -> dict[str, Any]:
        stats = empty()
        try:
            stored = json.loads(self._file.read_text())
        except (OSError, ValueError):
            return stats
        if isinstance(stored, dict):
            for name in COUNTERS:
                if isinstance(stored.get(name), int):
                    stats[name] = stored[name]
            for name in BREAKDOWNS:
                if isinstance(stored.get(name), dict):
                    stats[name] = {k: v for k, v in stored[name].items() if isinstance(v, int)}
            last = stored.get("last_errors")
            if isinstance(last, dict):
                stats["last_errors"] = {k: v for k, v in last.items() if isinstance(v, str)}
            if isinstance(stored.get("since"), int):
                stats["since"] = stored["since"]
        return stats

    def _save(self, stats: dict[str, Any]) -> None:
        replace_with(self._file, json.dumps(stats, sort_keys=True).encode())

    def read(self) -> dict[str, Any]:
        with self._locked():
            return self._load()

    def add(
        self,
        counters: dict[str, int],
        reason: str | None = None,
        error: str | None = None,
        miss: str | None = None,
        detail: str | None = None,
    ) -> None:
        """Add ``counters``; count ``reason`` (non-cacheable), ``error`` kinds (keeping
        ``detail``, what the error said, as its kind's last) and ``miss`` categories."""
        with self._locked():
            stats = self._load()
            for name, value in counters.items():
                stats[name] = stats.get(name, 0) + value
            if reason:
                reasons = stats["non_cacheable_reasons"]
                reasons[reason] = reasons.get(reason, 0) + 1
            if error:
                kinds = stats["error_kinds"]
                kinds[error] = kinds.get(error, 0) + 1
                if detail:
                    stats["last_errors"][error] = detail[:MAX_DETAIL]
            if miss:
                categories = stats["miss_categories"]
                categories[miss] = categories.get(miss, 0) + 1
            self._save(stats)

    def zero(self) -> None:
        with self._locked():
            self._save(empty())


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


def render(stats: dict[str, Any]) -> str:
    """The human form of ``--stats``."""
    cacheable = stats["hits"] + stats["misses"]
    rate = f"{100 * stats['hits'] / cacheable:.1f}%" if cacheable else "n/a"

    def breakdown(name: str) -> str:
        items = sorted(stats[name].items(), key=lambda item: (-item[1], item[0]))
        return ", ".join(f"{key} {value}" for key, value in items)

    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stats["since"]))
    lines = [
        f"larder-rustc statistics since {since}",
        f"  hits              {stats['hits']}",
        f"  misses            {stats['misses']}"
        + (f"  ({breakdown('miss_categories')})" if stats["miss_categories"] else ""),
        f"  hit rate          {rate}",
        f"  non-cacheable     {stats['non_cacheable']}"
        + (f"  ({breakdown('non_cacheable_reasons')})" if stats["non_cacheable_reasons"] else ""),
        f"  errors            {stats['errors']}"
        + (f"  ({breakdown('error_kinds')})" if stats["error_kinds"] else ""),
        *(f"    last {kind}: {text}" for kind, text in sorted(stats["last_errors"].items())),
        f"  uploads           {stats['uploads']}",
        f"  downloaded        {_size(stats['bytes_down'])}",
        f"  uploaded          {_size(stats['bytes_up'])}",
        f"  time in cache     {stats['cache_ms']} ms",
        f"  time in rustc     {stats['compile_ms']} ms",
    ]
    return "\n".join(lines)
