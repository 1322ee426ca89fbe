"""What the operator documentation states about settings stays true to the code."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def docs_text() -> str:
    """README.md and docs/*.md, as one text."""
    return "".join(p.read_text() for p in [ROOT / "README.md", *sorted(ROOT.glob("docs/*.md"))])


def test_max_connections_is_documented_per_process() -> None:
    # Each worker process has its own connection guard (service/server.py): every place that
    # states the limit says so, and what it means for the whole server.
    places = {
        "README.md": (ROOT / "README.md").read_text(),
        "docs/security.md": (ROOT / "docs" / "security.md").read_text(),
        "larder/service/config.py": (ROOT / "larder" / "service" / "config.py").read_text(),
        "helm/larder/values.yaml": (ROOT / "helm" / "larder" / "values.yaml").read_text(),
    }
    for name, text in places.items():
        around = " ".join(
            text[max(0, m.start() - 300) : m.end() + 300]
            for m in re.finditer(r"max_connections|maxConnections", text)
        )
        assert re.search(r"(each|per)\s+server\s+process", around, re.I), name


def test_every_local_pip_install_in_the_docs_names_a_project() -> None:
    # Commands run from the repository's root: a path they install must hold a pyproject.toml.
    commands = re.findall(r"pip install ([^\n#`]*)", docs_text())
    paths = [
        word.strip("'\"").split("[")[0]
        for command in commands
        for word in command.split()
        if word.strip("'\"").startswith(".")
    ]
    assert paths, commands
    for path in paths:
        assert (ROOT / path / "pyproject.toml").is_file(), f"pip install {path}"
