"""Fixtures shared by the shim's tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def crate(tmp_path: Path) -> Path:
    """A one-file library crate (``src/lib.rs``) with an empty ``out`` directory."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "lib.rs").write_text("pub fn answer() -> u32 { 42 }\n")
    (tmp_path / "out").mkdir()
    return tmp_path
