"""narinfo: real files from `nix copy` (every compression), round trips, and malformed input."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from larder.errors import FormatError
from larder.protocol import narinfo, nix32
from larder.protocol.compression import COMPRESSIONS
from larder.protocol.hashes import NixHash, parse_hash
from larder.protocol.narinfo import NarInfo
from larder.protocol.storepath import StorePath

from .conftest import fixture_id, narinfo_files, narinfo_path, real_path, store_nars

BY_PATH = {nar.path: nar for nar in store_nars()}


@pytest.mark.parametrize("path", narinfo_files(), ids=fixture_id)
def test_real_narinfo_renders_byte_identical(path: Path) -> None:
    raw = path.read_bytes()
    info = narinfo.parse(raw)
    assert narinfo.render(info).encode() == raw
    assert narinfo.parse(raw.decode()) == info


@pytest.mark.parametrize("path", narinfo_files(), ids=fixture_id)
def test_the_store_path_of_a_rendered_narinfo_is_read_from_its_first_line(path: Path) -> None:
    info = narinfo.parse(path.read_bytes())
    assert narinfo.stored_path_of(narinfo.render(info).encode()) == info.store_path


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"URL: nar/x.nar\nStorePath: /nix/store/" + b"0" * 32 + b"-x\n",  # not first
        b"StorePath: /nix/store/" + b"0" * 32 + b"-\xff\n",
        b"StorePath: /tmp/" + b"0" * 32 + b"-x\n",
        b"StorePath: /nix/store/" + b"e" * 32 + b"-x\n",  # e is not a nix32 digit
        b"StorePath: /nix/store/" + b"0" * 32 + b"-xy",  # no newline: not one larder wrote
    ],
)
def test_the_store_path_of_other_documents_is_none(data: bytes) -> None:
    assert narinfo.stored_path_of(data) is None


@pytest.mark.parametrize("path", narinfo_files(), ids=fixture_id)
def test_real_narinfo_matches_nix_path_info(path: Path) -> None:
    info = narinfo.parse(path.read_bytes())
    real = BY_PATH[info.store_path.full]
    assert info.store_path.hash == path.name.removesuffix(".narinfo")
    assert real.nar_hash is not None
    assert info.nar_hash == parse_hash(real.nar_hash)
    assert info.nar_hash.hex() == real.sha256_hex == hashlib.sha256(real.nar).hexdigest()
    assert info.nar_size == real.nar_size == len(real.nar)
    assert sorted(ref.full for ref in info.references) == sorted(real.references)
    assert (info.deriver.full if info.deriver else None) == real.deriver
    assert info.ca == real.ca
    # What the URL points at is what FileHash / FileSize describe.
    compression = path.parent.name
    assert info.compression == compression
    assert (
        info.url
        == f"nar/{info.file_hash.nix32() if info.file_hash else ''}.nar"
        + (COMPRESSIONS[compression])
    )
    assert info.file_hash is not None and info.file_size is not None
    if compression == "none":
        assert (info.file_hash, info.file_size) == (info.nar_hash, info.nar_size)
    else:
        data = (path.parent / info.url).read_bytes()
        assert info.file_hash == NixHash("sha256", hashlib.sha256(data).digest())
        assert info.file_size == len(data)


def test_real_narinfo_facts() -> None:
    """What Nix 2.8 writes, as documented in larder.protocol.narinfo."""
    texts = {p: p.read_text() for p in narinfo_files()}
    for text in texts.values():
        keys = [line.split(":", 1)[0] for line in text.splitlines()]
        order = [k for k in narinfo.KNOWN_KEYS if k in keys]
        assert keys == order  # Nix's key order
        assert "Compression" in keys and "FileHash" in keys and "FileSize" in keys
        assert "unknown-deriver" not in text
    leaf = texts[narinfo_path("larder-leaf")]
    assert "\nReferences: \n" in leaf  # no references: the space is still written
    added = texts[narinfo_path("larder-added")]
    assert "Deriver" not in added and "\nCA: fixed:r:sha256:" in added
    refs = texts[narinfo_path("larder-refs")]
    (line,) = [line for line in refs.splitlines() if line.startswith("References: ")]
    bases = line.removeprefix("References: ").split(" ")
    assert bases == sorted(bases) and len(bases) == 2


def test_self_reference() -> None:
    info = narinfo.parse(narinfo_path("larder-self").read_bytes())
    assert info.references == (info.store_path,)
    assert narinfo.fingerprint(info).endswith(";" + info.store_path.full)


def test_signatures_do_not_depend_on_compression() -> None:
    sigs: dict[str, set[tuple[str, ...]]] = defaultdict(set)
    fingerprints: dict[str, set[str]] = defaultdict(set)
    for path in narinfo_files():
        info = narinfo.parse(path.read_bytes())
        sigs[info.store_path.full].add(info.sigs)
        fingerprints[info.store_path.full].add(narinfo.fingerprint(info))
    assert len(sigs) == len(store_nars())
    assert all(len(s) == 1 for s in sigs.values())
    assert all(len(f) == 1 for f in fingerprints.values())


def test_fingerprint_layout() -> None:
    info = narinfo.parse(narinfo_path("larder-refs").read_bytes())
    reversed_refs = replace(info, references=tuple(reversed(info.references)))
    assert (
        narinfo.fingerprint(reversed_refs)
        == narinfo.fingerprint(info)
        == (
            f"1;{real_path('larder-refs')};{info.nar_hash.to_nix()};{info.nar_size};"
            f"{real_path('larder-leaf')},{real_path('larder-tree')}"
        )
    )


LEAF = narinfo_path("larder-leaf").read_text()
LEAF_INFO = narinfo.parse(LEAF)
NAR_HASH = LEAF_INFO.nar_hash


def edit(text: str, key: str, value: str | None) -> str:
    """``text`` with the line of ``key`` given a new value, or removed when ``value`` is None."""
    lines = text.splitlines(keepends=True)
    out = [
        line if not line.startswith(key + ":") else ("" if value is None else f"{key}: {value}\n")
        for line in lines
    ]
    return "".join(out)


def test_missing_compression_means_bzip2() -> None:
    info = narinfo.parse(edit(LEAF, "Compression", None))
    assert info.compression == "bzip2"
    assert "Compression: bzip2\n" in narinfo.render(info)


def test_lenient_where_nix_is() -> None:
    assert narinfo.parse(LEAF.replace("References: \n", "References:\n")).references == ()
    assert narinfo.parse(LEAF + "Unknown: whatever: here\nX-Y.z: 1\n") == LEAF_INFO
    assert narinfo.parse(edit(LEAF, "Deriver", "unknown-deriver")).deriver is None
    assert narinfo.parse(edit(LEAF, "Deriver", None)).deriver is None
    no_file = edit(edit(LEAF, "FileHash", None), "FileSize", None)
    assert narinfo.parse(no_file).file_hash is None
    assert narinfo.parse(no_file).file_size is None
    two_sigs = LEAF + "Sig: other:" + base64.b64encode(bytes(64)).decode() + "\n"
    assert len(narinfo.parse(two_sigs).sigs) == 2


@pytest.mark.parametrize(
    "encoded",
    [
        NAR_HASH.to_nix(),
        NAR_HASH.sri(),
        "sha256:" + NAR_HASH.hex(),
        "sha256:" + base64.b64encode(NAR_HASH.digest).decode(),
    ],
)
def test_nar_hash_in_any_encoding_renders_as_nix32(encoded: str) -> None:
    info = narinfo.parse(edit(LEAF, "NarHash", encoded))
    assert info == LEAF_INFO
    assert narinfo.render(info) == LEAF


GOOD_SIG = "k:" + base64.b64encode(bytes(64)).decode()
REF = real_path("larder-tree").removeprefix("/nix/store/")

MALFORMED: list[tuple[str, bytes | str, str]] = [
    ("empty", b"", "narinfo is empty"),
    ("no final newline", LEAF[:-1], "line 10 is not terminated by a newline"),
    ("CRLF", LEAF.replace("\n", "\r\n"), "line 1: carriage return"),
    ("tab", LEAF.replace("URL: ", "URL:\t"), "line 2: control char"),
    ("NUL", LEAF.replace("Compression: xz", "Compression: x\0z"), "line 3: control char"),
    ("DEL", LEAF.replace("Compression: xz", "Compression: x\x7fz"), "line 3: control char"),
    ("not utf-8", LEAF.encode().replace(b"xz\n", b"x\xffz\n"), "not UTF-8"),
    ("lone surrogate", LEAF.replace("xz\n", "x\udc80z\n"), "lone surrogate"),
    ("too large", LEAF + "X: " + "y" * (1 << 20) + "\n", "larger than 1048576 bytes"),
    ("blank line", LEAF + "\n", "line 11: '' is not 'Key: value'"),
    ("no colon", LEAF + "Junk\n", "line 11: 'Junk' is not 'Key: value'"),
    ("no space", LEAF.replace("URL: ", "URL:"), "line 2: URL: expected ': '"),
    ("space in key", LEAF.replace("URL:", "U RL:"), "line 2: invalid key 'U RL'"),
    ("empty key", LEAF + ": x\n", "line 11: invalid key ''"),
    ("two spaces", LEAF.replace("URL: ", "URL:  "), "line 2: URL has extra spaces"),
    ("trailing space", LEAF.replace(".nar.xz", ".nar.xz "), "line 2: URL has extra spaces"),
    ("missing StorePath", edit(LEAF, "StorePath", None), "missing required key StorePath"),
    ("missing URL", edit(LEAF, "URL", None), "missing required key URL"),
    ("missing NarHash", edit(LEAF, "NarHash", None), "missing required key NarHash"),
    ("missing NarSize", edit(LEAF, "NarSize", None), "missing required key NarSize"),
    ("duplicate URL", LEAF + "URL: x\n", "line 11: duplicate key URL (first on line 2)"),
    ("duplicate NarHash", LEAF + f"NarHash: {NAR_HASH.to_nix()}\n", "duplicate key NarHash"),
    ("duplicate References", LEAF + "References: \n", "duplicate key References"),
    ("duplicate Deriver", LEAF + "Deriver: unknown-deriver\n", "duplicate key Deriver"),
    ("empty URL", edit(LEAF, "URL", ""), "line 2: URL is empty"),
    ("empty Compression", edit(LEAF, "Compression", ""), "line 3: Compression is empty"),
    ("empty CA", LEAF + "CA: \n", "line 11: CA is empty"),
    ("CA kind", LEAF + "CA: garbage:not-a-content-address\n", "line 11: CA 'garbage:"),
    ("CA digest", LEAF + "CA: fixed:md5:x\n", "CA 'fixed:md5:x'"),
    ("CA text not sha256", LEAF + "CA: text:sha1:" + "0" * 40 + "\n", "expected a sha256"),
    ("CA blake3", LEAF + "CA: fixed:r:blake3:" + "0" * 63 + "\n", "not a BLAKE3 digest"),
    ("CA long", LEAF + "CA: fixed:r:sha256:" + "a" * 500_000 + "\n", "..."),
    ("empty Deriver", edit(LEAF, "Deriver", ""), "line 9: Deriver is empty"),
    ("space in Compression", edit(LEAF, "Compression", "x z"), "Compression 'x z' contains"),
    ("StorePath not in store", edit(LEAF, "StorePath", "/tmp/x"), "line 1: StorePath: store"),
    ("StorePath base name", edit(LEAF, "StorePath", REF), "line 1: StorePath: store path"),
    ("StorePath bad hash", edit(LEAF, "StorePath", "/nix/store/" + "e" * 32 + "-x"), "hash"),
    ("StorePath bad name", edit(LEAF, "StorePath", "/nix/store/" + "0" * 32 + "-.-x"), "'.-x'"),
    ("NarSize negative", edit(LEAF, "NarSize", "-1"), "line 7: NarSize '-1' is not a decimal"),
    ("NarSize plus", edit(LEAF, "NarSize", "+136"), "NarSize '+136' is not a decimal"),
    ("NarSize leading zero", edit(LEAF, "NarSize", "0136"), "NarSize '0136' is not a decimal"),
    ("NarSize junk", edit(LEAF, "NarSize", "136x"), "NarSize '136x' is not a decimal"),
    ("NarSize float", edit(LEAF, "NarSize", "1e3"), "NarSize '1e3' is not a decimal"),
    ("NarSize unicode digit", edit(LEAF, "NarSize", "١٣٦"), "is not a decimal"),
    ("NarSize underscore", edit(LEAF, "NarSize", "1_36"), "is not a decimal"),
    ("NarSize huge", edit(LEAF, "NarSize", "9" * 21), "is not a decimal"),
    ("NarSize 2^63", edit(LEAF, "NarSize", str(1 << 63)), "NarSize 9223372036854775808 is too"),
    ("NarSize zero", edit(LEAF, "NarSize", "0"), "line 7: NarSize must be positive"),
    ("FileSize junk", edit(LEAF, "FileSize", "0x10"), "line 5: FileSize '0x10' is not a decimal"),
    ("NarHash md5", edit(LEAF, "NarHash", "md5:" + "0" * 32), "NarHash must be sha256, not md5"),
    ("NarHash garbage", edit(LEAF, "NarHash", "sha256:xyz"), "line 6: NarHash: hash"),
    ("NarHash bare", edit(LEAF, "NarHash", NAR_HASH.nix32()), "NarHash: hash"),
    ("FileHash garbage", edit(LEAF, "FileHash", "sha256:"), "line 4: FileHash: hash"),
    ("References bad", edit(LEAF, "References", "not-a-path"), "line 8: References: invalid"),
    ("References full path", edit(LEAF, "References", "/nix/store/" + REF), "References:"),
    ("References double space", edit(LEAF, "References", f"{REF}  {REF[1:]}"), "References"),
    ("References trailing space", edit(LEAF, "References", REF + " "), "extra spaces"),
    ("References duplicate", edit(LEAF, "References", f"{REF} {REF}"), f"lists {REF} twice"),
    ("Deriver bad", edit(LEAF, "Deriver", "x.drv"), "line 9: Deriver: invalid store path"),
    ("Sig no name", LEAF + "Sig: " + GOOD_SIG[2:] + "\n", "line 11: Sig"),
    ("Sig empty name", LEAF + "Sig: " + GOOD_SIG[1:] + "\n", "is not <key name>:<base64>"),
    ("Sig bad base64", LEAF + "Sig: k:@@@@\n", "line 11: Sig 'k:@@@@' is not valid base64"),
    ("Sig short", LEAF + "Sig: k:" + base64.b64encode(bytes(63)).decode() + "\n", "63 bytes"),
    ("Sig long", LEAF + "Sig: k:" + base64.b64encode(bytes(65)).decode() + "\n", "65 bytes"),
    ("Sig empty", LEAF + "Sig: \n", "line 11: Sig '' is not <key name>:<base64>"),
]


@pytest.mark.parametrize(
    ("data", "message"), [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED]
)
def test_malformed(data: bytes | str, message: str) -> None:
    with pytest.raises(FormatError, match=re.escape(message)):
        narinfo.parse(data)


# -- round trip -----------------------------------------------------------------------------

store_hashes = st.text(alphabet=nix32.ALPHABET, min_size=32, max_size=32)
names = st.from_regex(r"[A-Za-z0-9+\-_?=][A-Za-z0-9+\-._?=]{0,40}", fullmatch=True)
store_paths = st.builds(StorePath, store_hashes, names)
sha256s = st.builds(NixHash, st.just("sha256"), st.binary(min_size=32, max_size=32))
any_hashes = st.one_of(
    sha256s, st.builds(NixHash, st.just("sha512"), st.binary(min_size=64, max_size=64))
)
tokens = st.from_regex(r"[!-~]{1,60}", fullmatch=True)
sigs = st.builds(
    lambda name, raw: f"{name}:{base64.b64encode(raw).decode()}",
    st.from_regex(r"[!-9;-~]{1,20}", fullmatch=True),
    st.binary(min_size=64, max_size=64),
)

narinfos = st.builds(
    NarInfo,
    store_path=store_paths,
    url=st.one_of(tokens, st.from_regex(r"nar/[a-z0-9]{52}\.nar\.(xz|zst)", fullmatch=True)),
    compression=st.sampled_from(["none", "xz", "bzip2", "zstd", "br"]),
    nar_hash=sha256s,
    nar_size=st.integers(min_value=1, max_value=(1 << 63) - 1),
    references=st.lists(store_paths, unique=True, max_size=5).map(tuple),
    deriver=st.none() | store_paths,
    sigs=st.lists(sigs, max_size=3).map(tuple),
    ca=st.none()
    | st.tuples(
        st.sampled_from(["text:sha256:", "fixed:sha256:", "fixed:r:sha256:"]),
        st.binary(min_size=32, max_size=32).map(nix32.encode),
    ).map("".join),
    file_hash=st.none() | any_hashes,
    file_size=st.none() | st.integers(min_value=0, max_value=(1 << 63) - 1),
)


@settings(deadline=None)
@given(narinfos)
def test_render_parse_round_trip(info: NarInfo) -> None:
    text = narinfo.render(info)
    assert text.endswith("\n") and "\r" not in text
    assert narinfo.parse(text) == info
    assert narinfo.parse(text.encode()) == info
    assert narinfo.render(narinfo.parse(text)) == text


@given(st.binary(max_size=400))
def test_parse_never_crashes_on_bytes(data: bytes) -> None:
    with contextlib.suppress(FormatError):
        narinfo.parse(data)


@given(st.data())
def test_parse_never_crashes_on_mutations(data: st.DataObject) -> None:
    text = LEAF
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(text)))
        text = (
            text[:pos] + data.draw(st.text(max_size=3)) + text[pos + data.draw(st.integers(0, 3)) :]
        )
    with contextlib.suppress(FormatError):
        narinfo.parse(text)


@pytest.mark.parametrize(
    "ca",
    [
        "text:sha256:" + "1" * 52,
        "fixed:r:sha256:" + "1" * 52,
        "fixed:sha256:" + "ab" * 32,
        "fixed:git:sha1:" + "0" * 40,
        "fixed:r:sha512:" + base64.b64encode(bytes(64)).decode(),
        "fixed:r:blake3:" + "0" * 64,
    ],
)
def test_content_addresses_nix_writes(ca: str) -> None:
    assert narinfo.parse(LEAF + f"CA: {ca}\n").ca == ca
