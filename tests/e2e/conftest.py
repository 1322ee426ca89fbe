"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

import pytest

from tests.e2e.nix import VERSIONS, NixVersion


@pytest.fixture(params=VERSIONS, ids=lambda version: version.label)
def nix_version(request: pytest.FixtureRequest) -> NixVersion:
    """Each Nix release the tests drive, in turn; a missing one fails the test."""
    version: NixVersion = request.param
    version.check()
    return version
