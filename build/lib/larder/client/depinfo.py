"""rustc's dep-info files (``--emit=dep-info``): Makefile rules plus ``# env-dep:`` lines.

Format as rustc writes it::

    /abs/target/debug/deps/leaf-1a2b.d: src/lib.rs src/util.rs

    src/lib.rs:
    src/util.rs:

    # env-dep:CARGO_PKG_VERSION=0.1.0
    # env-dep:LARDER_DEMO_GREETING

Paths are space-separated with ``\\ `` escaping a space in a name; a file appears once as a
dependency of each output and once as an empty rule. An ``env-dep`` line records a variable read
by ``env!``/``option_env!`` and its value (no ``=`` when unset, with ``\\n`` and ``\\\\`` escaped).
Other ``#`` lines (checksums on nightly) are ignored.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_SPLIT = re.compile(r"(?<!\\) ")
ENV_DEP = "# env-dep:"


class DepInfo(NamedTuple):
    """The source files a compilation read and the environment variables it looked at."""

    files: tuple[str, ...]
    env: tuple[tuple[str, str | None], ...]


def _paths(text: str) -> list[str]:
    return [part.replace("\\ ", " ") for part in _SPLIT.split(text.strip()) if part]


def parse(text: str) -> DepInfo:
    """The files and env-deps of a dep-info document (files in first-seen order)."""
    files: dict[str, None] = {}
    env: dict[str, str | None] = {}
    for line in text.splitlines():
        if line.startswith(ENV_DEP):
            name, sep, value = line[len(ENV_DEP) :].partition("=")
            env[name] = value if sep else None
        elif line.strip() and not line.startswith("#"):
            _, _, tail = line.partition(": ")
            for path in _paths(tail):
                files.setdefault(path)
    return DepInfo(tuple(files), tuple(sorted(env.items())))
