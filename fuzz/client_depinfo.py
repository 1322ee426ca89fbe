"""Fuzz target: the shim's dep-info parser (``larder.client.depinfo``) and the portable form of
the paths it finds (``larder.client.paths.Roots``), as a restored entry's dep-info goes through.

Invariant: ``parse`` never raises and yields non-empty paths, each once, and env-deps sorted by
name; turning text into its portable form and back on the same machine is the identity.
"""

from __future__ import annotations

from pathlib import Path

from fuzz.common import instrumented, main, text

with instrumented():
    from larder.client import depinfo
    from larder.client.paths import Roots

ROOTS = Roots.of(CWD=Path("/w/app"), TARGET=Path("/w/app/target"), CARGO_HOME=Path("/h/.cargo"))


def one_input(data: bytes) -> None:
    document = text(data)
    info = depinfo.parse(document)
    assert all(info.files) and len(set(info.files)) == len(info.files)
    names = [name for name, _ in info.env]
    assert names == sorted(set(names))
    if "@LARDER:" not in document:
        assert ROOTS.local(ROOTS.portable(document)) == document


if __name__ == "__main__":
    main(one_input)
