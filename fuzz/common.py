"""What every fuzz target shares: instrumented imports, the invariant, the libFuzzer entry.

A target module defines ``one_input(data: bytes) -> None`` and calls :func:`main` from
``if __name__ == "__main__"``. ``one_input`` catches exactly the larder domain errors its parser
is documented to raise for invalid input; any other exception escapes and libFuzzer records the
input as a crash. A hang is an input that runs longer than libFuzzer's ``-timeout``; memory
growth past ``-rss_limit_mb`` is a crash too. :mod:`fuzz.run` starts targets with those limits.

The parsers are imported inside :func:`instrumented`, so atheris adds coverage feedback to
larder's own modules (and only to them: the standard library and dependencies stay fast).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import atheris


def instrumented() -> AbstractContextManager[Any]:
    """A ``with`` block whose first imports of ``larder`` modules get coverage feedback."""
    return atheris.instrument_imports(include=["larder"])


def main(one_input: Callable[[bytes], None]) -> None:
    """Run libFuzzer on ``one_input`` with this process's command line (libFuzzer flags)."""
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


def text(data: bytes) -> str:
    """Bytes as text the way Python hands undecodable bytes over (URLs, argv, files)."""
    return data.decode("utf-8", "surrogateescape")
