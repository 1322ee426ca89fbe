"""Replacing a file of the state directory whole: readers see the old content or the new."""

from __future__ import annotations

import os
from pathlib import Path


def replace_with(path: Path, data: bytes) -> None:
    """Write ``data`` to a scratch file beside ``path`` (``.<name>.<pid>``) and rename it over
    ``path``; on any failure (a full disk) the scratch file is removed, so a failing state
    directory does not fill with one per call."""
    scratch = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        scratch.write_bytes(data)
        os.replace(scratch, path)
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise
