"""The listener's open-file limit: raised so that max_connections connections fit."""

from __future__ import annotations

import resource
import subprocess
import sys

RAISE = """
import resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
from larder.service.front.limits import raise_open_file_limit
print(raise_open_file_limit(int(sys.argv[1])), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


def _raised(connections: int) -> list[int]:
    done = subprocess.run(
        [sys.executable, "-c", RAISE, str(connections)], capture_output=True, text=True, check=True
    )
    return [int(n) for n in done.stdout.split()]


def test_soft_open_file_limit_is_raised_to_fit_max_connections() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    wanted = 1000 + 256
    expected = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    assert _raised(1000) == [expected, expected]
    assert _raised(0) == [256, 256]  # no limit on connections: nothing to make room for
