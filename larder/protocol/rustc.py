"""The rustc artifact manifest: what one cached compilation produced.

Spec (larder's own, version 1). A manifest is a UTF-8 JSON object, at most
:data:`MAX_MANIFEST_SIZE` bytes, stored under the compilation's cache key (64 lowercase hex)::

    {
      "version": 1,
      "crate": "serde",                      # crate name, for stats and logs
      "outputs": [                           # files rustc wrote into --out-dir, sorted by name
        {"name": "libserde-1a2b.rlib", "blake3": "<64 hex>", "size": 123456, "mode": 420},
        ...
      ],
      "stdout": "...",                       # what rustc printed, with paths normalised
      "stderr": "...",
      "exit_code": 0                         # only successful compilations are cached
    }

Version 2 is the same, except that ``stdout`` and ``stderr`` are replaced by ``"printed_zst"``:
the base64 of one zstd frame holding the JSON array ``[stdout, stderr]``, which decodes to at
most :data:`MAX_PRINTED` bytes. A client writes it only when version 1 would exceed
:data:`MAX_MANIFEST_SIZE` (a crate printing thousands of warnings: rustc's JSON diagnostics
shrink some sixtyfold), so readers of version 1 alone still read every other manifest and
refuse these (counted as corrupt: they compile) rather than replay nothing. The server checks
the frame's shape, not its text; ``larder verify`` decodes it.

``name`` is a plain file name (``[A-Za-z0-9._+-]``, not ``.``/``..``, at most 255 bytes), unique
within the manifest; ``blake3`` is the BLAKE3 of the file's bytes, which is also its blob id in
larder's store; ``mode`` is the permission bits (0-0o777). The key itself is derived by the client
(see :mod:`larder.client.key`); the server only checks its shape.

A *direct entry* records what a compilation's dep-info run named, under the compilation's direct
key (see :mod:`larder.client.key`): ``{"sources": [<portable path>, ...], "env": [<variable>,
...]}``, at most :data:`MAX_DIRECT_SOURCES` paths of at most 4096 characters and
:data:`MAX_DIRECT_ENV` names of ``[A-Za-z_][A-Za-z0-9_]*``. An entry of a linked crate (a binary,
proc-macro, dylib or cdylib) also has ``"link": [<token>, ...]``, the linker command rustc ran
in portable form (see :mod:`larder.client.linkline`), at most :data:`MAX_DIRECT_LINK` non-empty
tokens of at most 4096 characters; other entries have no ``link``. A direct key can hold
several entries (served as ``{"entries": [...]}``, at most :data:`MAX_DIRECT_ENTRIES`).

Missing-blob queries are ``{"blobs": [<64 hex>, ...]}`` (at most :data:`MAX_QUERY_BLOBS`),
answered with ``{"missing": [...]}`` in the order asked.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from typing import Any, Final, NamedTuple

from larder.errors import FormatError

MANIFEST_VERSION: Final = 1
#: The version whose printed text is compressed (``printed_zst``).
PACKED_VERSION: Final = 2
MAX_MANIFEST_SIZE: Final = 1024 * 1024
#: The most a version 2 manifest's printed text decodes to (its JSON array).
MAX_PRINTED: Final = 64 * 1024 * 1024
_ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"
MAX_OUTPUTS: Final = 64
MAX_QUERY_BLOBS: Final = 10_000
MAX_DIRECT_SOURCES: Final = 10_000
MAX_DIRECT_ENV: Final = 1_000
MAX_DIRECT_ENTRIES: Final = 32
MAX_DIRECT_LINK: Final = 10_000

_KEY = re.compile(r"[0-9a-f]{64}")
_FILE_NAME = re.compile(r"[A-Za-z0-9._+-]{1,255}")
_CRATE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")


def check_key(key: str) -> str:
    """Return ``key`` if it is 64 lowercase hex digits (a cache key or a blob id)."""
    if not _KEY.fullmatch(key):
        raise FormatError(f"invalid key {key[:80]!r}: expected 64 lowercase hex digits")
    return key


def check_file_name(name: str) -> str:
    """Return ``name`` if it is a plain output file name, safe to join to a directory."""
    if not _FILE_NAME.fullmatch(name) or name in (".", ".."):
        raise FormatError(f"invalid output file name {name[:80]!r}")
    return name


class Output(NamedTuple):
    """One file of a compilation's output."""

    name: str
    blake3: str
    size: int
    mode: int = 0o644


class Manifest(NamedTuple):
    """A cached compilation: its outputs and what rustc printed (``stdout`` and ``stderr``, or
    in version 2 ``printed_zst``: read both with :meth:`printed`)."""

    crate: str
    outputs: tuple[Output, ...]
    stdout: str = ""
    stderr: str = ""
    exit_code: int = 0
    version: int = MANIFEST_VERSION
    printed_zst: str = ""

    @classmethod
    def made(cls, crate: str, outputs: tuple[Output, ...], stdout: str, stderr: str) -> Manifest:
        """The manifest of a compilation: version 1, unless only version 2 fits (the module)."""
        plain = cls(crate, outputs, stdout, stderr)
        if len(plain.to_json()) <= MAX_MANIFEST_SIZE:
            return plain
        text = json.dumps([stdout, stderr], separators=(",", ":")).encode()
        if len(text) > MAX_PRINTED:
            return plain  # no reader would take it: too large either way
        import zstandard  # imported when used: every compilation loads this module

        packed = zstandard.ZstdCompressor(level=3).compress(text)  # 7 MB in 5 ms: 1/65
        encoded = base64.b64encode(packed).decode("ascii")
        return cls(crate, outputs, version=PACKED_VERSION, printed_zst=encoded)

    def printed(self) -> tuple[str, str]:
        """``(stdout, stderr)``; :class:`FormatError` when version 2's text does not decode."""
        if self.version != PACKED_VERSION:
            return self.stdout, self.stderr
        import zstandard

        try:
            packed = base64.b64decode(self.printed_zst, validate=True)
            reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(packed))
            text = reader.read(MAX_PRINTED + 1)
        except (binascii.Error, zstandard.ZstdError) as exc:
            raise FormatError(f"manifest printed text does not decode: {exc}") from None
        if len(text) > MAX_PRINTED:
            raise FormatError(f"manifest printed text decodes to more than {MAX_PRINTED} bytes")
        doc = load_json(text, "manifest printed text")
        if not (isinstance(doc, list) and len(doc) == 2 and all(isinstance(t, str) for t in doc)):
            raise FormatError("manifest printed text must be [stdout, stderr]")
        return doc[0], doc[1]

    def to_json(self) -> bytes:
        doc: dict[str, object] = {
            "version": self.version,
            "crate": self.crate,
            "outputs": [
                {"name": o.name, "blake3": o.blake3, "size": o.size, "mode": o.mode}
                for o in self.outputs
            ],
        }
        if self.version == PACKED_VERSION:
            doc["printed_zst"] = self.printed_zst
        else:
            doc["stdout"], doc["stderr"] = self.stdout, self.stderr
        doc["exit_code"] = self.exit_code
        return json.dumps(doc, separators=(",", ":")).encode()

    @property
    def total_size(self) -> int:
        return sum(output.size for output in self.outputs)


def load_json(data: bytes, what: str) -> Any:
    """``data`` as JSON (RFC 8259); :class:`FormatError` naming ``what`` when it is not: bytes
    that are not UTF-8 (a BOM or UTF-16 included), ``NaN`` or ``Infinity``, an object naming a
    member twice, a string with a lone surrogate (``"\\ud800"``: no UTF-8 can carry it, so the
    document could not be written back), or nesting too deep to read."""
    try:
        text = data.decode("utf-8")
        doc = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_members)
        if "\\u" in text:  # only an escape can make a lone surrogate
            json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError) as exc:  # UnicodeError is a ValueError
        raise FormatError(f"{what} is not JSON: {str(exc)[:200]}") from None
    return doc


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise ValueError("an object names a member twice")
    return doc


def _field(doc: dict[str, Any], name: str, kind: type) -> Any:
    value = doc.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise FormatError(f"manifest field {name!r} must be a {kind.__name__}")
    return value


def _output(item: object) -> Output:
    if not isinstance(item, dict):
        raise FormatError("manifest outputs must be objects")
    size = _field(item, "size", int)
    mode = _field(item, "mode", int)
    if size < 0:
        raise FormatError(f"output size must not be negative: {size}")
    if not 0 <= mode <= 0o777:
        raise FormatError(f"output mode must be permission bits (0-0o777): {mode}")
    return Output(
        name=check_file_name(_field(item, "name", str)),
        blake3=check_key(_field(item, "blake3", str)),
        size=size,
        mode=mode,
    )


def parse_manifest(data: bytes) -> Manifest:
    """Parse and validate a manifest; :class:`FormatError` says what is wrong."""
    if len(data) > MAX_MANIFEST_SIZE:
        raise FormatError(f"manifest larger than {MAX_MANIFEST_SIZE} bytes")
    doc = load_json(data, "manifest")
    if not isinstance(doc, dict):
        raise FormatError("manifest must be a JSON object")
    version = _field(doc, "version", int)
    if version not in (MANIFEST_VERSION, PACKED_VERSION):
        raise FormatError(f"unsupported manifest version {version} (this server reads 1 and 2)")
    crate = _field(doc, "crate", str)
    if not _CRATE.fullmatch(crate):
        raise FormatError(f"invalid crate name {crate[:80]!r}")
    items = _field(doc, "outputs", list)
    if not items or len(items) > MAX_OUTPUTS:
        raise FormatError(f"a manifest lists 1 to {MAX_OUTPUTS} outputs, not {len(items)}")
    outputs = tuple(_output(item) for item in items)
    names = [output.name for output in outputs]
    if len(set(names)) != len(names):
        raise FormatError("manifest lists an output file name twice")
    exit_code = _field(doc, "exit_code", int)
    if exit_code != 0:
        raise FormatError("only successful compilations (exit_code 0) are cached")
    outputs = tuple(sorted(outputs, key=lambda o: o.name))
    if version == PACKED_VERSION:
        packed = _field(doc, "printed_zst", str)
        try:
            frame = base64.b64decode(packed, validate=True)
        except binascii.Error:
            raise FormatError("manifest field 'printed_zst' must be base64") from None
        if not frame.startswith(_ZSTD_MAGIC):
            raise FormatError("manifest field 'printed_zst' must hold a zstd frame")
        return Manifest(crate, outputs, exit_code=exit_code, version=version, printed_zst=packed)
    return Manifest(
        crate=crate,
        outputs=outputs,
        stdout=_field(doc, "stdout", str),
        stderr=_field(doc, "stderr", str),
        exit_code=exit_code,
    )


def parse_blob_query(data: bytes) -> list[str]:
    """The blob ids of a missing-blobs query, validated."""
    doc = load_json(data, "query")
    blobs = doc.get("blobs") if isinstance(doc, dict) else None
    if not isinstance(blobs, list) or len(blobs) > MAX_QUERY_BLOBS:
        raise FormatError(f'query must be {{"blobs": [...]}} with at most {MAX_QUERY_BLOBS} ids')
    return [check_key(blob) if isinstance(blob, str) else check_key(repr(blob)) for blob in blobs]


class DirectEntry(NamedTuple):
    """The files (portable paths) and variables a dep-info run named; a linked crate's link."""

    sources: list[str]
    env: list[str]
    link: list[str] = []  # noqa: RUF012 - never mutated; empty for crates that do not link

    def to_json(self) -> bytes:
        doc: dict[str, list[str]] = {"sources": self.sources, "env": self.env}
        if self.link:
            doc["link"] = self.link
        return json.dumps(doc, separators=(",", ":")).encode()


def _direct_entry(doc: object) -> DirectEntry:
    if not isinstance(doc, dict):
        raise FormatError("a direct entry must be a JSON object")
    sources, env = doc.get("sources"), doc.get("env")
    if not isinstance(sources, list) or len(sources) > MAX_DIRECT_SOURCES:
        raise FormatError(f"direct entry 'sources' must list at most {MAX_DIRECT_SOURCES} paths")
    if not isinstance(env, list) or len(env) > MAX_DIRECT_ENV:
        raise FormatError(f"direct entry 'env' must list at most {MAX_DIRECT_ENV} names")
    for path in sources:
        if not isinstance(path, str) or not path or len(path) > 4096 or "\0" in path:
            raise FormatError("direct entry sources must be non-empty paths without NUL")
    for name in env:
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise FormatError(f"invalid environment variable name {str(name)[:80]!r}")
    link = doc.get("link", [])
    if not isinstance(link, list) or len(link) > MAX_DIRECT_LINK:
        raise FormatError(f"direct entry 'link' must list at most {MAX_DIRECT_LINK} tokens")
    for token in link:
        if not isinstance(token, str) or not token or len(token) > 4096 or "\0" in token:
            raise FormatError("direct entry link tokens must be non-empty strings without NUL")
    return DirectEntry(list(sources), list(env), list(link))


def parse_direct_entry(data: bytes) -> DirectEntry:
    """One direct entry, validated."""
    if len(data) > MAX_MANIFEST_SIZE:
        raise FormatError(f"direct entry larger than {MAX_MANIFEST_SIZE} bytes")
    return _direct_entry(load_json(data, "direct entry"))


def parse_direct_entries(data: bytes) -> list[DirectEntry]:
    """The server's answer for a direct key: ``{"entries": [...]}``."""
    doc = load_json(data, "direct entries")
    entries = doc.get("entries") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or len(entries) > MAX_DIRECT_ENTRIES:
        raise FormatError(f'expected {{"entries": [...]}} with at most {MAX_DIRECT_ENTRIES}')
    return [_direct_entry(entry) for entry in entries]
