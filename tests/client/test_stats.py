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
