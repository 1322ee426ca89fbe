"""The dependency pins agree with each other: pyproject's lower bounds are what
constraints-lowest.txt installs (and ``make test-lowest`` tests), constraints.txt satisfies
pyproject, and the lint tools are pinned exactly."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_REQUIREMENT = re.compile(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*(.*)")


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def _requirements(group: list[str]) -> dict[str, dict[str, str]]:
    """name -> {operator: version} for each requirement (``>=1.2,<2`` -> two entries)."""
    found: dict[str, dict[str, str]] = {}
    for line in group:
        match = _REQUIREMENT.fullmatch(line.strip())
        assert match, line
        specs = {}
        for spec in filter(None, (part.strip() for part in match.group(2).split(","))):
            operator, version = re.fullmatch(r"(==|>=|<=|<|>|~=)\s*(\S+)", spec).groups()  # type: ignore[union-attr]
            specs[operator] = version
        found[_name(match.group(1))] = specs
    return found


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[_name(name)] = version.strip()
    return pins


def _release(version: str) -> tuple[int, ...]:
    """``3.14`` -> (3, 14, 0): the release numbers, padded to three."""
    numbers = [int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3]]
    return tuple(numbers + [0] * (3 - len(numbers)))


PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
RUNTIME = _requirements(PROJECT["dependencies"])
TEST = _requirements(PROJECT["optional-dependencies"]["test"])


def test_every_runtime_dependency_has_a_lower_bound_tested_at_its_lowest() -> None:
    lowest = _pins(ROOT / "constraints-lowest.txt")
    for name, specs in RUNTIME.items():
        assert ">=" in specs, f"{name} has no lower bound"
        assert name in lowest, f"constraints-lowest.txt does not install {name}"
        assert _release(lowest[name]) == _release(specs[">="]), name


def test_constraints_satisfy_pyproject() -> None:
    pinned = _pins(ROOT / "constraints.txt")
    for name, specs in {**RUNTIME, **TEST}.items():
        assert name in pinned, f"constraints.txt does not pin {name}"
        version = _release(pinned[name])
        if ">=" in specs:
            assert version >= _release(specs[">="]), name
        if "<" in specs:
            assert version < _release(specs["<"]), name
        if "==" in specs and not specs["=="].endswith("*"):
            assert pinned[name] == specs["=="], name


def test_tools_that_gate_ci_are_pinned_exactly() -> None:
    for tool in ("ruff", "mypy", "pytest"):
        assert "==" in TEST[tool], f"{tool} is not pinned exactly"
