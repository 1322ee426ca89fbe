"""Why a crate missed: ``larder-rustc explain [CRATE] [--json]``.

On a miss the shim asks the cache for the keys it stored most recently for the same crate
(package, crate name, version, crate types, target: :class:`~larder.protocol.inputs.Identity`),
reads up to :data:`MAX_COMPARED` of their inputs documents and compares each with this
compilation's inputs (:func:`larder.protocol.inputs.explain`); the nearest names the category.
The lookup runs only on a miss, after rustc, on the connection already open, each request under
``LARDER_TIMEOUT`` and all of them within :data:`BUDGET_SECONDS`; any failure makes the miss
``unknown`` and nothing else. A linked crate (binary, proc-macro...) that misses has no key of its
own unless a direct entry gave one; it is compared by what it has (items 2-4 and 7-10, and its
crate root).

Each explained miss is written to ``explain/<crate stem>.json`` in the state directory with the
build it belongs to (cargo's process: the shim's parent, and its start time). ``explain`` shows
the misses of the last build that had any: each crate's category and its differing inputs. A
crate that missed only because a dependency did (``--extern`` files differ, nothing of its own)
is followed down its dependencies' records in the same build to the first crates whose own
inputs differ: ``dependency changed: leaf`` (a dependency that did not miss in that build ends
the walk under its own name).

``env!`` values are never printed or sent in clear: they are compared and shown as BLAKE3
hashes, except variables on the safe list, :data:`SAFE_ENV` plus the names in
``LARDER_EXPLAIN_SAFE_ENV`` (comma-separated; ``NAME*`` is a prefix).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from larder.client.atomic import replace_with
from larder.protocol.inputs import TITLES, Difference, Explanation, Identity, explain, redact

if TYPE_CHECKING:
    from larder.client.remote import Remote

MAX_COMPARED = 4
BUDGET_SECONDS = 2.0
KEEP_SECONDS = 30 * 24 * 3600
RECORDS = "explain"
#: Variables whose values ``explain`` may show: what cargo sets about the package and profile.
SAFE_ENV = (
    "CARGO_PKG_*",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_MANIFEST_DIR",
    "CARGO_CFG_*",
    "CARGO_PRIMARY_PACKAGE",
    "OUT_DIR",
    "PROFILE",
    "OPT_LEVEL",
    "DEBUG",
    "TARGET",
    "HOST",
    "RUSTC_BOOTSTRAP",
)
_SHOWN_PATHS = (
    ("@LARDER:CWD@/", ""),
    ("@LARDER:TARGET@", "<target>"),
    ("@LARDER:CARGO_HOME@", "$CARGO_HOME"),
)


def safe_env(environ: Mapping[str, str]) -> Callable[[str], bool]:
    """Whether a variable's value may be shown (and stored) in clear."""
    extra = [n.strip() for n in environ.get("LARDER_EXPLAIN_SAFE_ENV", "").split(",") if n.strip()]
    names = {n for n in (*SAFE_ENV, *extra) if not n.endswith("*")}
    prefixes = tuple(n[:-1] for n in (*SAFE_ENV, *extra) if n.endswith("*"))

    def safe(name: str) -> bool:
        return name in names or name.startswith(prefixes)

    return safe


#: The calling ``larder-rustc``'s parent, when the call runs in another process
#: (:mod:`larder.client.resident`).
PARENT_PID: int | None = None


_BUILD_IDS: dict[int, str] = {}


def build_id() -> str:
    """This build: cargo's process (the shim's parent) and its start time; remembered, as
    cargo may have exited by the time a call that handed back its exit code early records."""
    parent = PARENT_PID or os.getppid()
    if parent not in _BUILD_IDS:
        try:
            stat = Path(f"/proc/{parent}/stat").read_text()
            started = stat.rpartition(")")[2].split()[19]
        except (OSError, IndexError):
            started = "?"
        _BUILD_IDS[parent] = f"{parent}-{started}"
    return _BUILD_IDS[parent]


def stem_of(path: str) -> str:
    """``leaf-1a2b`` for ``.../libleaf-1a2b.rlib`` (an ``--extern`` file's crate stem)."""
    name = Path(path).name
    name = name.removeprefix("lib")
    return name.rpartition(".")[0] or name


def explain_miss(
    remote: Remote, identity: Identity, current: Mapping[str, Any]
) -> Explanation | None:
    """The explanation by the nearest stored inputs; None when this cache keeps none."""
    started = time.monotonic()
    nearest = remote.nearest(identity)
    if nearest is None:
        return None
    stored: list[tuple[str, dict[str, Any]]] = []
    for item in nearest[:MAX_COMPARED]:
        if stored and time.monotonic() - started > BUDGET_SECONDS:
            break
        inputs = remote.get_inputs(item.key)
        if inputs is not None:
            stored.append((item.key, inputs))
    if nearest and not stored:
        return Explanation("unknown", [Difference("unknown", "inputs", "documents unreadable")])
    return explain(current, stored)


def record(
    state: Path,
    *,
    crate: str,
    package: str,
    stem: str,
    explanation: Explanation,
    externs: Mapping[str, str],
) -> None:
    """Write one miss's explanation (``externs``: dependency name -> its crate stem)."""
    dependencies = {
        d.item: externs[d.item]
        for d in explanation.differences
        if d.category == "dependency" and d.item in externs
    }
    doc = {
        "build": build_id(),
        "time": time.time(),
        "crate": crate,
        "package": package,
        "stem": stem,
        "category": explanation.category,
        "differences": [list(d) for d in explanation.differences],
        "dependencies": dependencies,
        "nearest": explanation.nearest,
    }
    directory = state / RECORDS
    directory.mkdir(parents=True, exist_ok=True)
    replace_with(directory / f"{stem}.json", json.dumps(doc, sort_keys=True).encode())


def load(state: Path) -> list[dict[str, Any]]:
    """Every recorded miss (records older than :data:`KEEP_SECONDS` are deleted)."""
    found = []
    directory = state / RECORDS
    now = time.time()
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict) or not isinstance(doc.get("time"), int | float):
            continue
        if now - doc["time"] > KEEP_SECONDS:
            path.unlink(missing_ok=True)
            continue
        found.append(doc)
    return found


def last_build(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not records:
        return []
    latest = max(records, key=lambda doc: doc["time"])["build"]
    return sorted((d for d in records if d.get("build") == latest), key=lambda d: d["time"])


def name_of(doc: Mapping[str, Any]) -> str:
    """The crate's name as shown: a build script by its package, ``build_script_build/pkg``."""
    crate = str(doc.get("crate"))
    return f"{crate}/{doc.get('package')}" if crate == "build_script_build" else crate


def root_causes(doc: Mapping[str, Any], by_stem: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The first crates down the changed dependencies whose own inputs differ."""
    roots: list[str] = []
    seen: set[str] = set()

    def changed(found: Mapping[str, Any]) -> list[tuple[str, str | None]]:
        stems = dict(found.get("dependencies") or {})
        names = [d[1] for d in found.get("differences") or [] if d[0] == "dependency"]
        return [(name, stems.get(name)) for name in names]

    pending = changed(doc)
    while pending:
        name, stem = pending.pop(0)
        if stem is not None:
            if stem in seen:
                continue
            seen.add(stem)
        found = by_stem.get(stem) if stem is not None else None
        if found is not None and found.get("category") == "dependency":
            pending += changed(found)
            continue
        shown = name_of(found) if found is not None else name
        if shown not in roots:
            roots.append(shown)
    return roots


#: C0 and C1 control characters: what a stored document says reaches a terminal without them.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def show(text: str) -> str:
    """``text`` for a terminal: placeholders as their short names, control characters
    escaped (``\\x1b``), so a stored document cannot draw over what ``explain`` prints."""
    for placeholder, shown in _SHOWN_PATHS:
        text = text.replace(placeholder, shown)
    return _CONTROL.sub(lambda found: f"\\x{ord(found.group()):02x}", text)


def reason(doc: Mapping[str, Any], by_stem: Mapping[str, Mapping[str, Any]]) -> str:
    """The one-line reason: ``source file: crates/leaf/src/lib.rs``, ``dependency changed:
    leaf``, ``never built``."""
    category = str(doc.get("category"))
    title = TITLES.get(category, category)
    if category == "dependency":
        return f"{title}: {', '.join(root_causes(doc, by_stem))}"
    own = [d for d in doc.get("differences") or [] if d[0] == category]
    return f"{title}: {show(str(own[0][1]))}" if own else title


def summaries(records: list[dict[str, Any]], build: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What ``explain`` shows of ``records``, following dependencies through ``build``'s
    records only: an older build's record of the same crate may describe other inputs."""
    by_stem = {str(doc.get("stem")): doc for doc in build}
    return [
        {
            "crate": name_of(doc),
            "package": doc.get("package"),
            "category": doc.get("category"),
            "reason": reason(doc, by_stem),
            "differences": [
                Difference(*d).render() if len(d) == 3 else str(d)
                for d in doc.get("differences") or []
            ],
        }
        for doc in records
    ]


#: What ``larder-rustc explain --help`` prints.
EXPLAIN_USAGE = """\
usage: larder-rustc explain [CRATE] [--json]

Why the last build's crates missed the cache: for each, the input that differs from what the
cache holds for the same crate (a source, a dependency, a flag or feature, an environment
variable, the toolchain, a build script's output, what a link read).
CRATE: a crate or package name, to show that one only. --json: the same as JSON.
"""


def command(argv: list[str], state: Path) -> int:
    """``larder-rustc explain [CRATE] [--json]``."""
    if "-h" in argv[1:] or "--help" in argv[1:]:
        print(EXPLAIN_USAGE, end="")
        return 0
    as_json = "--json" in argv
    wanted = [arg for arg in argv[1:] if not arg.startswith("--")]
    build = last_build(load(state))
    shown = build
    if wanted:
        shown = [d for d in build if wanted[0] in (d.get("crate"), d.get("package"), name_of(d))]
    found = summaries(shown, build)
    if as_json:
        print(json.dumps(found, indent=2))
        return 0
    if not found:
        print("larder-rustc: no explained misses" + (f" for {wanted[0]}" if wanted else ""))
        return 0 if not wanted else 1
    for item in found:
        print(f"{show(str(item['crate']))}: {show(item['reason'])}")
        for line in item["differences"]:
            print(f"    {show(line)}")
    sys.stdout.flush()
    return 0


__all__ = ["command", "explain_miss", "record", "redact", "safe_env"]
