"""Cross-references stay true: every Sphinx role in the package's docstrings and comments names
something that exists, and every source path the docs, docstrings and comments mention exists.

A module moved or renamed without its references fails here, not in a reader's head.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import re
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "larder"
ROLE = re.compile(r":(?:mod|class|func|meth|attr|data|exc|obj):`~?([A-Za-z_.][\w.]*)`")
# Paths inside the repository as prose writes them: larder/service/app.py, service/app.py,
# tests/wait.py, bench/harness.py, docs/gc.md.
SOURCE_PATH = re.compile(
    r"(?<![\w/.-])((?:larder/)?(?:service|core|protocol|storage|client)/[\w/]+\.py"
    r"|(?:tests|bench|tools|fuzz)/[\w/]+\.(?:py|sh)|docs/[\w-]+\.md)"
)
TEXT_FILES = [
    *sorted(PACKAGE.rglob("*.py")),
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "README.md",
    ROOT / "bench" / "README.md",
    ROOT / "pyproject.toml",
    ROOT / "Makefile",
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _lookup(start: object, names: list[str]) -> bool:
    obj = start
    for name in names:
        if not hasattr(obj, name):
            return False
        obj = getattr(obj, name)
    return True


def _resolves(target: str, module: ModuleType) -> bool:
    """Whether ``target`` names something, read as Sphinx would from inside ``module``."""
    if target.startswith("."):
        package = module.__name__ if hasattr(module, "__path__") else module.__package__ or ""
        candidates = [package + target, module.__name__ + target]
    else:
        candidates = [target, f"{module.__name__}.{target}"]
    for candidate in candidates:
        parts = candidate.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                found = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            if _lookup(found, parts[cut:]):
                return True
            break
        if _lookup(module, target.lstrip(".").split(".")):
            return True
    if "." not in target:
        return _unqualified(target, module)
    return False


def _unqualified(name: str, module: ModuleType) -> bool:
    """A bare name, as Sphinx reads it: a builtin, a member of a class of this module (a method
    named in its class's docstring), or a name of a sibling module (an import done lazily)."""
    if hasattr(builtins, name):
        return True
    classes = [value for value in vars(module).values() if isinstance(value, type)]
    if any(hasattr(cls, name) for cls in classes):
        return True
    if re.search(
        rf"\bself\.{re.escape(name)}(?:: [^=]+)? = ", Path(module.__file__ or "").read_text()
    ):
        return True  # an instance attribute
    package = importlib.import_module(module.__package__ or module.__name__)
    siblings = Path(package.__file__ or "").parent.glob("*.py")
    return any(
        hasattr(importlib.import_module(f"{package.__name__}.{sibling.stem}"), name)
        for sibling in siblings
        if sibling.stem != "__init__"
    )


def _roles(path: Path) -> list[tuple[int, str]]:
    """The roles in ``path``'s docstrings and comments (line, target)."""
    text = path.read_text()
    return [
        (text.count("\n", 0, match.start()) + 1, match.group(1)) for match in ROLE.finditer(text)
    ]


MODULES = [path for path in sorted(PACKAGE.rglob("*.py")) if path.name != "__main__.py"]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_roles_name_what_exists(path: Path) -> None:
    ast.parse(path.read_text())  # a file that does not parse fails here with its own message
    module = importlib.import_module(_module_name(path))
    stale = [
        f"line {line}: {target}" for line, target in _roles(path) if not _resolves(target, module)
    ]
    assert not stale, f"{path.relative_to(ROOT)} refers to what does not exist: {stale}"


def _exists(mentioned: str) -> bool:
    if (ROOT / mentioned).exists():
        return True
    return (PACKAGE / mentioned).exists() and not mentioned.startswith("larder/")


@pytest.mark.parametrize("path", TEXT_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_source_paths_exist(path: Path) -> None:
    text = path.read_text()
    missing = sorted(
        {match.group(1) for match in SOURCE_PATH.finditer(text) if not _exists(match.group(1))}
    )
    assert not missing, f"{path.relative_to(ROOT)} mentions paths that do not exist: {missing}"


def test_the_checks_catch_a_stale_reference() -> None:
    module = importlib.import_module("larder.service.app")
    assert _resolves("larder.service.front.connection.FrontProtocol", module)
    assert _resolves(".config", module)
    assert not _resolves("larder.service.fastpath.FrontProtocol", module)
    assert not _resolves(".no_such_module", module)
    assert _resolves("build_app", module) and _resolves("OSError", module)
    assert not _resolves("no_such_name", module)
    assert not _exists("service/fastpath.py")
    assert _exists("service/front/short_path.py")
