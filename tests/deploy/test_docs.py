"""What the operator documentation states about settings stays true to the code."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

from larder.service.cli import build_parser
from larder.service.config import Config

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


def test_every_setting_is_documented() -> None:
    text = docs_text()
    for setting in fields(Config):
        named = re.search(rf"\b{setting.name}\b", text) or f"LARDER_{setting.name.upper()}" in text
        assert named, f"setting {setting.name} is named in no doc"


def _options(parser: argparse.ArgumentParser, path: list[str]) -> Iterator[tuple[str, str]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, [*path, name])
        for option in action.option_strings:
            if option.startswith("--") and option not in ("--help", "--storage", "--config"):
                yield " ".join(path), option


def test_every_flag_is_documented_with_its_command() -> None:
    lines = docs_text().splitlines()
    windows = ["\n".join(lines[i : i + 2]) for i in range(len(lines))]
    for command, option in _options(build_parser(), []):
        shown = any(command in window and option in window for window in windows)
        assert shown, f"larder {command} {option} is shown in no doc"


def test_the_synopsis_shows_repeated_options_as_repeated() -> None:
    # "--key PUBKEY ..." reads as several keys after one --key; argparse takes one per --key.
    synopsis = re.search(r"```\nlarder serve.*?```", docs_text(), re.S)
    assert synopsis is not None
    assert not re.search(r"--\w[\w-]* [A-Z]+ \.\.\.", synopsis[0])


def test_the_s3_timeouts_the_security_notes_give_are_the_codes() -> None:
    """An operator sizes probe timeouts and alerts from these figures."""
    import inspect

    from larder.storage.s3 import SLOW_CALL_TIMEOUT, S3Storage

    text = (ROOT / "docs" / "security.md").read_text()
    outages = " ".join(text[text.index("**Storage outages.**") :].split("\n\n")[0].split())
    attempts = inspect.signature(S3Storage.__init__).parameters["max_attempts"].default
    assert f"{attempts} attempts" in outages
    assert f"up to {attempts} x {Config().storage_timeout:g} s (`storage_timeout`" in outages
    assert f"2 x {SLOW_CALL_TIMEOUT:g} s" in outages
    assert not re.search(r"\b60 s\b|read_timeout", outages)
