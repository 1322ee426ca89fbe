"""A bounded pass of every coverage-guided fuzz target (``fuzz/``) from the committed seeds.

Each target runs for a few seconds or ``RUNS`` executions in its own process; the pass fails on
any crash (an exception other than the parser's domain error, a broken invariant), a hang (an
input running past libFuzzer's per-input timeout) or a memory blow-up. Long passes:
``python -m fuzz.run --seconds N``.
"""

from __future__ import annotations

import pytest

from fuzz.run import TARGETS, run_target

SECONDS = 6
RUNS = 30_000
MIN_EXECUTIONS = 1_000  # the slowest target (NAR through the decompressors) runs >1,000/s


@pytest.mark.parametrize("target", TARGETS)
def test_bounded_fuzz_pass(target: str) -> None:
    result = run_target(target, seconds=SECONDS, runs=RUNS)
    assert result.ok, f"{target}: {result.artifacts}\n{result.problem()}"
    assert result.executions >= MIN_EXECUTIONS, result.output[-2000:]
    assert result.coverage > 0 and result.corpus > 0, result.output[-2000:]
