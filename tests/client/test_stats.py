"""The shim's statistics file when the state directory's disk is full."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from larder.client import stats


def test_a_failed_save_leaves_no_scratch_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = stats.Stats(tmp_path)
    store.add({"hits": 1})

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError):
        store.add({"hits": 1})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".stats-")) == []
    assert store.read()["hits"] == 1


def test_no_state_file_leaves_a_scratch_file_when_the_disk_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every file of the state directory is replaced whole through :mod:`larder.client.atomic`:
    a failed write or rename removes its scratch file (one was left per compilation)."""
    from larder.client import explain, toolchain
    from larder.client.atomic import replace_with
    from larder.protocol.inputs import Explanation

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError):
        replace_with(tmp_path / "f", b"data")
    # facts are still used when they cannot be kept (a read-only state directory had no hits)
    assert toolchain.cached(tmp_path, "toolchains.json", "id", lambda: {"x": 1}) == {"x": 1}
    with pytest.raises(OSError):
        explain.record(tmp_path, crate="t", package="t", stem="t-x",
                       explanation=Explanation("never_built", []), externs={})  # fmt: skip
    monkeypatch.undo()
    left = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert not [name for name in left if name.startswith(".")], left
