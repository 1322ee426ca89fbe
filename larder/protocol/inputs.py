"""A rustc key's recorded inputs, and which of them made another key miss.

Spec (larder's own, version 1). An *inputs document* is a UTF-8 JSON object of at most
:data:`MAX_INPUTS_SIZE` bytes, uploaded beside the manifest of the key it describes::

    {
      "version": 1,
      "identity": {                         # the crate, as "nearest keys" are looked up by
        "package": "leaf",                  # CARGO_PKG_NAME
        "crate": "leaf",                    # --crate-name (build scripts: build_script_build)
        "version": "0.1.0",                 # CARGO_PKG_VERSION
        "crate_type": "lib",                # --crate-type values, comma-joined
        "target": "x86_64-unknown-linux-gnu"
      },
      "inputs": {...}                       # the key's document (larder.client.key), with
    }                                       # env! values as {"blake3": <hex>} unless safe

``inputs`` is the canonical key document of :mod:`larder.client.key` (its numbered fields:
``format``, ``rustc``, ``sysroot``, ``args``, ``sources``, ``env_deps``, ``externs``,
``cargo_env``, ``out_dir``, ``native``, ``link``) except that the value of each ``env_deps``
variable that is not on the client's safe list is replaced by ``{"blake3": <hex of the
value>}``: the server never holds an ``env!`` value in clear unless the user said it is safe.
(The compiled crate itself may contain the value, and a read token can download it; a hash
hides no more than that, but it does not put the value in a second place.) The server checks
the shape only: ``inputs`` is an object of at most :data:`MAX_FIELDS` fields named
``[a-z_]{1,32}`` with a string ``format``; it never interprets them.

The server stores a document compressed, behind a one-line header naming the crate identity's
id (:func:`pack_stored`), so the collector can tell which index entry goes with it without
decompressing anything. The identity id is the BLAKE3 of the identity's canonical JSON; crate
names and versions never become storage paths.

A *nearest keys* answer is ``{"keys": [{"key": <64 hex>, "stored": <unix seconds>}, ...]}``,
most recent first, at most :data:`MAX_NEAREST` keys.

:func:`differences` compares two ``inputs`` objects and sorts every difference into one of
:data:`CATEGORIES` (a fixed set: metric labels use it). :func:`explain` picks, among stored
documents, the one nearest to the current inputs and names the main category.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, NamedTuple

import blake3

from larder.errors import FormatError
from larder.protocol.rustc import check_key, load_json

INPUTS_VERSION: Final = 1
MAX_INPUTS_SIZE: Final = 1024 * 1024
MAX_FIELDS: Final = 32
MAX_NEAREST: Final = 8
STORED_HEADER: Final = b"larder-inputs/1 "

#: Why a compilation missed. Fixed and small: a metric label takes these values only.
CATEGORIES: Final = (
    "never_built",
    "toolchain",
    "flags",
    "features",
    "source",
    "env",
    "dependency",
    "build_script",
    "link",
    "unknown",
)
TITLES: Final = {
    "never_built": "never built",
    "toolchain": "toolchain",
    "flags": "flags",
    "features": "features/cfg",
    "source": "source file",
    "env": "env! variable",
    "dependency": "dependency changed",
    "build_script": "build-script output",
    "link": "link inputs",
    "unknown": "unknown",
}
# The main reason of a miss with several: the first of these present. A crate's own inputs come
# before its dependencies ("dependency" only when nothing of its own differs).
PRECEDENCE: Final = (
    "toolchain",
    "flags",
    "features",
    "build_script",
    "source",
    "env",
    "link",
    "dependency",
    "unknown",
)

_PACKAGE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_CRATE = re.compile(r"[A-Za-z0-9_]{1,128}")
_VERSION = re.compile(r"[0-9][0-9A-Za-z.+-]{0,127}")
_CRATE_TYPE = re.compile(r"[a-z-]{1,16}(,[a-z-]{1,16}){0,7}")
_TARGET = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_FIELD = re.compile(r"[a-z_]{1,32}")
_IDENTITY_FIELDS = {
    "package": _PACKAGE,
    "crate": _CRATE,
    "version": _VERSION,
    "crate_type": _CRATE_TYPE,
    "target": _TARGET,
}
# Target-directory paths among the sources are what build scripts generated (OUT_DIR).
_TARGET_ROOT = "@LARDER:TARGET@/"
# -C options cargo derives from everything else (a consequence, never a cause on their own).
_DERIVED = ("-C=metadata=", "-C=extra-filename=")
_FEATURE_FLAGS = ("--cfg=", "--check-cfg=")
_MAX_SHOWN = 20


class Identity(NamedTuple):
    """What makes two compilations "the same crate" for finding the nearest stored keys."""

    package: str
    crate: str
    version: str
    crate_type: str
    target: str

    def as_dict(self) -> dict[str, str]:
        return dict(self._asdict())

    def id(self) -> str:
        canonical = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return blake3.blake3(canonical.encode()).hexdigest()

    def label(self) -> str:
        return f"{self.package} {self.version} ({self.crate} {self.crate_type}, {self.target})"


def check_identity(fields: Mapping[str, object]) -> Identity:
    """An :class:`Identity` from untrusted values (a query, a document); :class:`FormatError`
    names the first bad one."""
    values: dict[str, str] = {}
    for name, pattern in _IDENTITY_FIELDS.items():
        value = fields.get(name)
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise FormatError(f"invalid crate identity field {name}: {str(value)[:80]!r}")
        values[name] = value
    return Identity(**values)


class InputsDocument(NamedTuple):
    identity: Identity
    inputs: dict[str, Any]

    def to_json(self) -> bytes:
        doc = {
            "version": INPUTS_VERSION,
            "identity": self.identity.as_dict(),
            "inputs": self.inputs,
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def parse_document(data: bytes) -> InputsDocument:
    """Parse and check an inputs document (shape only)."""
    if len(data) > MAX_INPUTS_SIZE:
        raise FormatError(f"inputs document larger than {MAX_INPUTS_SIZE} bytes")
    doc = load_json(data, "inputs document")
    if not isinstance(doc, dict):
        raise FormatError("an inputs document must be a JSON object")
    version = doc.get("version")
    if type(version) is not int or version != INPUTS_VERSION:  # not true, not 1.0
        raise FormatError(f"unsupported inputs document version {str(doc.get('version'))[:20]}")
    identity = doc.get("identity")
    if not isinstance(identity, dict):
        raise FormatError("inputs document field 'identity' must be an object")
    inputs = doc.get("inputs")
    if not isinstance(inputs, dict) or not 0 < len(inputs) <= MAX_FIELDS:
        raise FormatError(f"inputs document field 'inputs' must be an object of 1-{MAX_FIELDS}")
    for name in inputs:
        if not _FIELD.fullmatch(name):
            raise FormatError(f"invalid inputs field name {name[:40]!r}")
    if not isinstance(inputs.get("format"), str):
        raise FormatError("inputs must name their key format")
    return InputsDocument(check_identity(identity), inputs)


def pack_stored(document: InputsDocument) -> bytes:
    """The stored form: ``larder-inputs/1 <identity id>\\n`` and the zstd-compressed JSON."""
    import zstandard

    body = zstandard.ZstdCompressor(level=3).compress(document.to_json())
    return STORED_HEADER + document.identity.id().encode() + b"\n" + body


def stored_identity(data: bytes) -> str:
    """The identity id in a stored document's header (without decompressing it)."""
    header, newline, _ = data[: len(STORED_HEADER) + 65].partition(b"\n")
    if not newline or not header.startswith(STORED_HEADER):
        raise FormatError("not a stored inputs document")
    return check_key(header[len(STORED_HEADER) :].decode("ascii", "replace"))


def unpack_stored(data: bytes) -> bytes:
    """The JSON of a stored document (decompressed, at most :data:`MAX_INPUTS_SIZE` bytes)."""
    import zstandard

    stored_identity(data)
    body = data[len(STORED_HEADER) + 65 :]
    try:
        size = zstandard.frame_content_size(body)
        if not 0 <= size <= MAX_INPUTS_SIZE:
            raise FormatError("stored inputs document too large, or of unknown size")
        document: bytes = zstandard.ZstdDecompressor().decompress(body)
    except zstandard.ZstdError as exc:
        raise FormatError(f"stored inputs document does not decompress: {exc}") from None
    return document


class Nearest(NamedTuple):
    key: str
    stored: int


def nearest_to_json(found: Iterable[Nearest]) -> bytes:
    keys = [{"key": item.key, "stored": item.stored} for item in found]
    return json.dumps({"keys": keys[:MAX_NEAREST]}, separators=(",", ":")).encode()


def parse_nearest(data: bytes) -> list[Nearest]:
    doc = load_json(data, "nearest keys")
    items = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(items, list) or len(items) > MAX_NEAREST:
        raise FormatError(f'expected {{"keys": [...]}} with at most {MAX_NEAREST} keys')
    found = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("stored"), int):
            raise FormatError("each nearest key is {key, stored}")
        found.append(Nearest(check_key(str(item.get("key"))), item["stored"]))
    return found


def report_to_json(crate: str, category: str) -> bytes:
    return json.dumps({"crate": crate, "category": category}, separators=(",", ":")).encode()


def parse_report(data: bytes) -> tuple[str, str]:
    """``(crate, category)`` of a shim's explained miss, ``{"crate", "category"}``."""
    doc = load_json(data, "miss report")
    if not isinstance(doc, dict):
        raise FormatError('a miss report is {"crate": ..., "category": ...}')
    crate, category = doc.get("crate"), doc.get("category")
    if not isinstance(crate, str) or not _PACKAGE.fullmatch(crate):
        raise FormatError(f"invalid crate name {str(crate)[:80]!r}")
    if category not in CATEGORIES:
        raise FormatError(f"unknown miss category {str(category)[:40]!r}")
    return crate, str(category)


# -- env values ---------------------------------------------------------------------------------


def value_digest(value: str) -> str:
    return blake3.blake3(value.encode()).hexdigest()


def redact(inputs: Mapping[str, Any], safe: Callable[[str], bool]) -> dict[str, Any]:
    """``inputs`` with every ``env_deps`` value whose variable is not ``safe`` as a hash."""
    out = dict(inputs)
    env = inputs.get("env_deps")
    if isinstance(env, list):
        out["env_deps"] = [
            [name, {"blake3": value_digest(value)}]
            if isinstance(value, str) and not safe(name)
            else [name, value]
            for name, value in (_pair(item) for item in env)
        ]
    return out


def _pair(item: object) -> tuple[str, Any]:
    if isinstance(item, list | tuple) and len(item) == 2:
        return str(item[0]), item[1]
    return str(item), None


def _env_norm(value: Any) -> str | None:
    if isinstance(value, dict):
        return str(value.get("blake3"))
    return None if value is None else value_digest(str(value))


def _env_shown(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, dict):
        return f"blake3:{str(value.get('blake3'))[:12]}"
    return json.dumps(value)


# -- differences --------------------------------------------------------------------------------


class Difference(NamedTuple):
    """One input that differs: its category, what it is, and how it differs."""

    category: str
    item: str
    detail: str

    def render(self) -> str:
        return f"{TITLES.get(self.category, self.category)}: {self.item}" + (
            f" ({self.detail})" if self.detail else ""
        )


def _short(value: object) -> str:
    return "absent" if value is None else str(value)[:12]


def _mapping(value: object) -> dict[str, Any]:
    if not isinstance(value, list):
        return {}
    return dict(_pair(item) for item in value)


def _compare_maps(
    category: str,
    current: dict[str, Any],
    stored: dict[str, Any],
    norm: Callable[[Any], Any] = lambda v: v,
    shown: Callable[[Any], str] = _short,
) -> list[Difference]:
    found = []
    for name in sorted(current.keys() | stored.keys()):
        if name not in stored:
            found.append(Difference(category, name, "added"))
        elif name not in current:
            found.append(Difference(category, name, "removed"))
        elif norm(current[name]) != norm(stored[name]):
            found.append(
                Difference(category, name, f"{shown(stored[name])} -> {shown(current[name])}")
            )
    return found


def display_arg(arg: str) -> str:
    """``-C target-cpu=native`` for the key's ``-C=target-cpu=native``."""
    flag, sep, value = arg.partition("=")
    if sep and not flag.startswith("--"):
        return f"{flag} {value}"
    return arg


def _args(current: list[str], stored: list[str]) -> tuple[list[Difference], list[Difference]]:
    """Argument differences, and separately those cargo derives (``-C metadata``...)."""
    now, before = Counter(current), Counter(stored)
    found: list[Difference] = []
    derived: list[Difference] = []
    for arg, how in [
        *((a, "added") for a in now - before),
        *((a, "removed") for a in before - now),
    ]:
        if arg.startswith("--extern="):
            continue  # the externs item names every added or removed dependency
        category = "features" if arg.startswith(_FEATURE_FLAGS) else "flags"
        difference = Difference(category, display_arg(arg), how)
        (derived if arg.startswith(_DERIVED) else found).append(difference)
    return found, derived


def _lines(text: object) -> list[str]:
    return str(text).splitlines() if text is not None else []


def _link(
    current: object, stored: object, rebuilt: frozenset[object], replaced: frozenset[object]
) -> list[Difference]:
    """Differences of item 11. The link reads every crate the binary depends on, direct or
    not: an input holding the new digest of a changed ``--extern`` (``rebuilt``) or its old
    one (``replaced``), any rlib that changed, and those paths in the link line (a new version:
    a new file name) are dependencies' changes, not the link's (``dependency`` when no
    ``--extern`` says so)."""
    if not isinstance(current, dict) or not isinstance(stored, dict):
        return [Difference("link", "link", "added" if stored is None else "removed")]
    now_inputs, before_inputs = _mapping(current.get("inputs")), _mapping(stored.get("inputs"))
    # A stored document is whatever the cache holds: only string digests are compared.
    theirs = {
        p
        for p, v in now_inputs.items()
        if isinstance(v, str) and v in rebuilt and before_inputs.get(p) != v
    }
    theirs |= {
        p
        for p, v in before_inputs.items()
        if isinstance(v, str) and v in replaced and now_inputs.get(p) != v
    }
    crates = {
        p
        for p in now_inputs.keys() | before_inputs.keys()
        if p.endswith(".rlib") and now_inputs.get(p) != before_inputs.get(p)
    }
    theirs |= crates
    found: list[Difference] = []
    if crates and not rebuilt and not replaced:
        for path in sorted(crates):
            found.append(Difference("dependency", path.rpartition("/")[2], "changed"))
    for name in sorted(current.keys() | stored.keys()):
        now, before = current.get(name), stored.get(name)
        if name == "line" and isinstance(now, list) and isinstance(before, list):
            now = [token for token in now if not (isinstance(token, str) and token in theirs)]
            before = [t for t in before if not (isinstance(t, str) and t in theirs)]
        if now == before:
            continue
        if name in ("inputs", "env") and isinstance(now, list) and isinstance(before, list):
            now_map, before_map = _mapping(now), _mapping(before)
            for path in theirs if name == "inputs" else ():
                now_map.pop(path, None)
                before_map.pop(path, None)
            found += _compare_maps("link", now_map, before_map)
        elif name == "sysroot_tools" and isinstance(now, dict) and isinstance(before, dict):
            found += _compare_maps("link", now, before)
        else:
            found.append(Difference("link", f"link {name}", "changed"))
    return found


def differences(current: Mapping[str, Any], stored: Mapping[str, Any]) -> list[Difference]:
    """Every difference between two ``inputs`` objects, by category.

    ``current`` may be partial (a linked crate's miss with no key: no ``sources``,
    ``env_deps`` or ``link``, and ``input``, the crate root's ``[path, blake3]``): what it lacks
    is not compared. Argument changes cargo derives from others (``-C metadata``, ``-C
    extra-filename``) count only when nothing else differs.
    """
    found: list[Difference] = []
    if current.get("format") != stored.get("format"):
        return [
            Difference(
                "unknown", "key format", f"{stored.get('format')} -> {current.get('format')}"
            )
        ]
    if current.get("rustc") != stored.get("rustc"):
        old, new = _lines(stored.get("rustc")), _lines(current.get("rustc"))
        changed = [line for line in new if line not in old] or ["-vV"]
        found.append(Difference("toolchain", "rustc -vV", "; ".join(changed)))
    found += _compare_maps(
        "toolchain", _mapping(current.get("sysroot")), _mapping(stored.get("sysroot"))
    )
    found = [
        d
        if d.category != "toolchain" or d.item == "rustc -vV"
        else d._replace(item=f"sysroot {d.item}")
        for d in found
    ]
    args, derived = _args(
        [str(a) for a in current.get("args") or []], [str(a) for a in stored.get("args") or []]
    )
    found += args
    # What a build script wrote (before the sources: generated files are among them too).
    found += _compare_maps(
        "build_script", _mapping(current.get("out_dir")), _mapping(stored.get("out_dir"))
    )
    if "sources" in current:
        for d in _compare_maps(
            "source", _mapping(current["sources"]), _mapping(stored.get("sources"))
        ):
            found.append(
                d._replace(category="build_script") if d.item.startswith(_TARGET_ROOT) else d
            )
    elif isinstance(current.get("input"), list) and len(current["input"]) == 2:
        path, digest = current["input"]
        before = _mapping(stored.get("sources")).get(path)
        if before != digest:
            detail = "added" if before is None else f"{_short(before)} -> {_short(digest)}"
            found.append(Difference("source", str(path), detail))
    if "env_deps" in current:
        found += _compare_maps(
            "env",
            _mapping(current["env_deps"]),
            _mapping(stored.get("env_deps")),
            _env_norm,
            _env_shown,
        )
    found += _compare_maps(
        "env",
        _mapping(current.get("cargo_env")),
        _mapping(stored.get("cargo_env")),
        shown=lambda v: json.dumps(v),
    )
    externs, stored_externs = _mapping(current.get("externs")), _mapping(stored.get("externs"))
    found += _compare_maps("dependency", externs, stored_externs)
    found += _compare_maps("link", _mapping(current.get("native")), _mapping(stored.get("native")))
    if "link" in current and current.get("link") != stored.get("link"):
        altered = {k for k in externs.keys() | stored_externs.keys()
                   if externs.get(k) != stored_externs.get(k)}  # fmt: skip
        rebuilt = frozenset(v for k in altered if isinstance(v := externs.get(k), str))
        replaced = frozenset(v for k in altered if isinstance(v := stored_externs.get(k), str))
        found += _link(current.get("link"), stored.get("link"), rebuilt, replaced)
    return found or derived


def main_category(found: Iterable[Difference]) -> str:
    present = {d.category for d in found}
    return next((c for c in PRECEDENCE if c in present), "unknown")


class Explanation(NamedTuple):
    """Why a key missed: the main category, every difference from the nearest stored key."""

    category: str
    differences: list[Difference]
    nearest: str | None = None


def explain(
    current: Mapping[str, Any], stored: Iterable[tuple[str, Mapping[str, Any]]]
) -> Explanation:
    """Compare ``current`` with each ``(key, inputs)`` stored for the same crate (most recent
    first) and explain the miss by the nearest: the fewest categories, then the fewest
    differences, then the most recent. Nothing stored: ``never_built``. A stored document
    identical to ``current``: ``unknown`` (its outputs were evicted or never uploaded)."""
    best: tuple[tuple[int, int], str, list[Difference]] | None = None
    for key, inputs in stored:
        found = differences(current, inputs)
        score = (len({d.category for d in found}), len(found))
        if best is None or score < best[0]:
            best = (score, key, found)
    if best is None:
        return Explanation("never_built", [])
    _, key, found = best
    if not found:
        return Explanation(
            "unknown", [Difference("unknown", "outputs", "same inputs stored without outputs")], key
        )
    return Explanation(main_category(found), found[:_MAX_SHOWN], key)
