"""``.narinfo`` documents of the Nix binary-cache protocol, and their signed fingerprint.

Spec: Nix ``src/libstore/nar-info.cc`` (``NarInfo::NarInfo``, ``NarInfo::to_string``) and
``src/libstore/path-info.cc`` (``ValidPathInfo::fingerprint``), checked against what Nix 2.8's
``nix copy --to file://...`` writes (golden files in ``tests/fixtures/nix/``).

A narinfo is UTF-8 text of ``Key: value`` lines, each terminated by ``\\n``. Nix writes the keys
in this order, each at most once except ``Sig``::

    StorePath: /nix/store/<hash>-<name>
    URL: nar/<filehash>.nar.xz
    Compression: xz
    FileHash: sha256:<nix32>
    FileSize: <decimal>
    NarHash: sha256:<nix32>
    NarSize: <decimal>
    References: <base name> <base name> ...      (``References: `` when there are none)
    Deriver: <base name>                         (omitted when unknown)
    Sig: <key name>:<base64 of 64 bytes>         (repeated, one per signature)
    CA: <content address>                        (only for content-addressed paths)

This parser is stricter than Nix's (it is the gate for uploads from the network):

* the input is at most 1 MiB of UTF-8 without control characters other than ``\\n``; every line
  ends with ``\\n`` (so CRLF is rejected) and is ``Key: value`` with exactly ``": "`` between
  them; ``Key:`` with nothing after the colon is read as an empty value;
* ``StorePath``, ``URL``, ``NarHash`` and ``NarSize`` are required; a missing ``Compression``
  means ``bzip2`` (Nix's rule); keys other than ``Sig`` must not repeat; unknown keys are ignored
  (and not kept);
* sizes are plain decimal (no sign, no leading zeros) below 2^63, ``NarSize`` is positive;
* ``NarHash`` must be sha256; hashes may use any encoding :func:`~larder.protocol.hashes.parse_hash`
  accepts and are always rendered ``sha256:<nix32>``;
* ``References`` are base names separated by single spaces, without duplicates (Nix keeps them in
  a set, so a duplicate would make the fingerprint disagree); their order is kept as given;
* ``Deriver: unknown-deriver`` (written by old Nix) means no deriver;
* ``Sig`` is ``<key name>:<base64>`` decoding to 64 bytes; signatures keep their order;
* ``CA`` is a content address as Nix writes it, ``text:sha256:<digest>`` or
  ``fixed:[r:|git:]<algo>:<digest>`` (a digest as ``parse_hash`` reads it; ``blake3`` too); it
  is kept as given.

:func:`render` writes the layout above byte for byte, so a narinfo written by Nix (whose
references and signatures are sorted) renders back identically.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from larder.errors import FormatError
from larder.protocol.hashes import NixHash, parse_digest, parse_hash
from larder.protocol.signing import KEY_NAME
from larder.protocol.storepath import StorePath

MAX_SIZE = 1024 * 1024
MAX_NUMBER = (1 << 63) - 1  # sizes are 64-bit in Nix
KNOWN_KEYS = (
    "StorePath",
    "URL",
    "Compression",
    "FileHash",
    "FileSize",
    "NarHash",
    "NarSize",
    "References",
    "Deriver",
    "Sig",
    "CA",
)
DEFAULT_COMPRESSION = "bzip2"
UNKNOWN_DERIVER = "unknown-deriver"

_KEY = re.compile(r"[^\s:]+")
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,19}")
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")


@dataclass(frozen=True)
class NarInfo:
    """The content of a ``.narinfo`` file (unknown keys are not kept)."""

    store_path: StorePath
    url: str
    compression: str
    nar_hash: NixHash
    nar_size: int
    references: tuple[StorePath, ...] = ()
    deriver: StorePath | None = None
    sigs: tuple[str, ...] = ()
    ca: str | None = None
    file_hash: NixHash | None = None
    file_size: int | None = None


def _size(value: str, key: str, lineno: int) -> int:
    if not _DECIMAL.fullmatch(value):
        raise FormatError(f"narinfo line {lineno}: {key} {value!r} is not a decimal number")
    size = int(value)
    if size > MAX_NUMBER:
        raise FormatError(f"narinfo line {lineno}: {key} {value} is too large")
    return size


def _check_sig(value: str, lineno: int) -> str:
    name, colon, sig = value.partition(":")
    if not colon or not KEY_NAME.fullmatch(name):
        raise FormatError(f"narinfo line {lineno}: Sig {value!r} is not <key name>:<base64>")
    try:
        raw = base64.b64decode(sig.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise FormatError(f"narinfo line {lineno}: Sig {value!r} is not valid base64") from None
    if len(raw) != 64:
        raise FormatError(
            f"narinfo line {lineno}: Sig of key {name!r} has {len(raw)} bytes, not 64"
        )
    return value


def _content_address(value: str, lineno: int) -> str:
    """``value`` if it is a content address Nix could have written (its ``ContentAddress``):
    a client reading a malformed one refuses the whole narinfo."""
    kind, _, rest = value.partition(":")
    if kind == "fixed":
        for method in ("r:", "git:"):
            rest = rest.removeprefix(method)
    blake3 = kind == "fixed" and rest.startswith("blake3:")
    try:
        if kind not in ("text", "fixed"):
            raise FormatError("expected text:... or fixed:...")
        if blake3:
            parse_digest("blake3", rest.removeprefix("blake3:"), 32)
        else:
            parse_hash(rest, "sha256" if kind == "text" else None)
    except FormatError as exc:
        shown = value if len(value) <= 120 else value[:117] + "..."
        what = "not a BLAKE3 digest: " if blake3 else ""
        raise FormatError(f"narinfo line {lineno}: CA {shown!r}: {what}{exc}") from None
    return value


def _store_path(value: str, key: str, lineno: int, *, base: bool) -> StorePath:
    try:
        return StorePath.parse_base(value) if base else StorePath.parse(value)
    except FormatError as exc:
        raise FormatError(f"narinfo line {lineno}: {key}: {exc.message}") from None


def _hash(value: str, key: str, lineno: int) -> NixHash:
    try:
        return parse_hash(value)
    except FormatError as exc:
        raise FormatError(f"narinfo line {lineno}: {key}: {exc.message}") from None


def stored_path_of(data: bytes) -> StorePath | None:
    """The StorePath of a narinfo larder rendered (:func:`render` writes it on the first line),
    read without parsing the rest; ``None`` when the first line is not a valid StorePath."""
    end = data.find(b"\n")
    first = data[:end]
    if end < 0 or not first.startswith(b"StorePath: "):
        return None
    try:
        return StorePath.parse(first[len(b"StorePath: ") :].decode("utf-8"))
    except (UnicodeDecodeError, FormatError):
        return None


def parse(data: bytes | str) -> NarInfo:
    """Parse a narinfo strictly (see the module docstring); raise :class:`FormatError`."""
    if isinstance(data, str):
        if len(data) > MAX_SIZE:
            raise FormatError(f"narinfo is larger than {MAX_SIZE} bytes")
        try:
            data = data.encode("utf-8")
        except UnicodeEncodeError:
            raise FormatError(
                "narinfo contains a lone surrogate (not encodable as UTF-8)"
            ) from None
    if len(data) > MAX_SIZE:
        raise FormatError(f"narinfo is larger than {MAX_SIZE} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"narinfo is not UTF-8 (invalid byte at offset {exc.start})") from None
    if not text:
        raise FormatError("narinfo is empty")
    if not text.endswith("\n"):
        raise FormatError(f"narinfo line {text.count(chr(10)) + 1} is not terminated by a newline")

    values: dict[str, tuple[str, int]] = {}
    sigs: list[str] = []
    for lineno, line in enumerate(text[:-1].split("\n"), start=1):
        bad = _CONTROL.search(line)
        if bad:
            what = "carriage return (CRLF line ending?)" if bad.group() == "\r" else "control char"
            raise FormatError(f"narinfo line {lineno}: {what} {bad.group()!r} is not allowed")
        key, colon, rest = line.partition(":")
        if not colon:
            raise FormatError(f"narinfo line {lineno}: {line[:80]!r} is not 'Key: value'")
        if not _KEY.fullmatch(key):
            raise FormatError(f"narinfo line {lineno}: invalid key {key[:80]!r}")
        if rest and not rest.startswith(" "):
            raise FormatError(f"narinfo line {lineno}: {key}: expected ': ' after the key")
        value = rest[1:]
        if key == "Sig":
            sigs.append(_check_sig(value, lineno))
            continue
        if key not in KNOWN_KEYS:
            continue
        if key in values:
            raise FormatError(
                f"narinfo line {lineno}: duplicate key {key} (first on line {values[key][1]})"
            )
        values[key] = (value, lineno)

    for required in ("StorePath", "URL", "NarHash", "NarSize"):
        if required not in values:
            raise FormatError(f"narinfo: missing required key {required}")
    for key, (value, lineno) in values.items():
        if not value and key != "References":
            raise FormatError(f"narinfo line {lineno}: {key} is empty")
        if value != value.strip(" "):
            raise FormatError(f"narinfo line {lineno}: {key} has extra spaces")

    value, lineno = values["StorePath"]
    store_path = _store_path(value, "StorePath", lineno, base=False)

    url = values["URL"][0]

    compression = DEFAULT_COMPRESSION
    if "Compression" in values:
        value, lineno = values["Compression"]
        if " " in value:
            raise FormatError(f"narinfo line {lineno}: Compression {value!r} contains a space")
        compression = value

    value, lineno = values["NarHash"]
    nar_hash = _hash(value, "NarHash", lineno)
    if nar_hash.algo != "sha256":
        raise FormatError(f"narinfo line {lineno}: NarHash must be sha256, not {nar_hash.algo}")

    value, lineno = values["NarSize"]
    nar_size = _size(value, "NarSize", lineno)
    if nar_size == 0:
        raise FormatError(f"narinfo line {lineno}: NarSize must be positive")

    file_hash = None
    if "FileHash" in values:
        value, lineno = values["FileHash"]
        file_hash = _hash(value, "FileHash", lineno)

    file_size = None
    if "FileSize" in values:
        value, lineno = values["FileSize"]
        file_size = _size(value, "FileSize", lineno)

    references: tuple[StorePath, ...] = ()
    if "References" in values:
        value, lineno = values["References"]
        if value:
            refs = [_store_path(item, "References", lineno, base=True) for item in value.split(" ")]
            if len(set(refs)) != len(refs):
                dup = next(ref for ref in refs if refs.count(ref) > 1)
                raise FormatError(f"narinfo line {lineno}: References lists {dup.base} twice")
            references = tuple(refs)

    deriver = None
    if "Deriver" in values:
        value, lineno = values["Deriver"]
        if value != UNKNOWN_DERIVER:
            deriver = _store_path(value, "Deriver", lineno, base=True)

    ca = None
    if "CA" in values:
        ca = _content_address(*values["CA"])

    return NarInfo(
        store_path=store_path,
        url=url,
        compression=compression,
        nar_hash=nar_hash,
        nar_size=nar_size,
        references=references,
        deriver=deriver,
        sigs=tuple(sigs),
        ca=ca,
        file_hash=file_hash,
        file_size=file_size,
    )


def render(info: NarInfo) -> str:
    """The narinfo text in Nix's layout (see the module docstring); Compression always written."""
    lines = [
        f"StorePath: {info.store_path.full}",
        f"URL: {info.url}",
        f"Compression: {info.compression}",
    ]
    if info.file_hash is not None:
        lines.append(f"FileHash: {info.file_hash.to_nix()}")
    if info.file_size is not None:
        lines.append(f"FileSize: {info.file_size}")
    lines.append(f"NarHash: {info.nar_hash.to_nix()}")
    lines.append(f"NarSize: {info.nar_size}")
    lines.append("References: " + " ".join(ref.base for ref in info.references))
    if info.deriver is not None:
        lines.append(f"Deriver: {info.deriver.base}")
    lines.extend(f"Sig: {sig}" for sig in info.sigs)
    if info.ca is not None:
        lines.append(f"CA: {info.ca}")
    return "\n".join(lines) + "\n"


def fingerprint(info: NarInfo) -> str:
    """The string a narinfo's ``Sig`` signs.

    ``1;<store path>;<sha256:nix32 NarHash>;<NarSize>;<references as full paths, sorted, ','>``.
    URL, Compression, FileHash, FileSize, Deriver and CA are not covered.
    """
    refs = ",".join(sorted(ref.full for ref in info.references))
    return f"1;{info.store_path.full};{info.nar_hash.to_nix()};{info.nar_size};{refs}"
