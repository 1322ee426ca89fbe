"""The committed seed corpus, built from the Nix fixtures and a few typical inputs.

``python -m fuzz.run --write-seeds`` writes what :func:`all_seeds` returns into
``fuzz/corpus/<target>/``. Each seed is laid out as its target's module docstring says (a mode
byte first where the target has one).
"""

from __future__ import annotations

import bz2
import hashlib
import json
import lzma
from pathlib import Path

import zstandard

from fuzz.tokens import SECRET, signed
from larder.protocol import tokens


def _name(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()  # libFuzzer names corpus files this way


def _named(items: list[bytes]) -> dict[str, bytes]:
    return {_name(data): data for data in items}


def narinfo_seeds(fixtures: Path) -> list[bytes]:
    return [path.read_bytes() for path in sorted((fixtures / "xz").glob("*.narinfo"))]


def nar_seeds(fixtures: Path) -> list[bytes]:
    nars = [path.read_bytes() for path in sorted((fixtures / "nars").glob("*.nar"))]
    small = [nar for nar in nars if len(nar) < 4096]
    out = [b"\x00" + nar for nar in nars] + [b"\x04" + nar for nar in small[:3]]
    for nar in small[:2]:
        out.append(b"\x01" + lzma.compress(nar))
        out.append(b"\x02" + bz2.compress(nar))
        out.append(b"\x03" + zstandard.ZstdCompressor().compress(nar))
    return out


def token_seeds() -> list[bytes]:
    claims = [
        tokens.TokenClaims("0123456789abcdef", "main", tokens.Scope.WRITE, 1_900_000_000, 1),
        tokens.TokenClaims("fedcba9876543210aa", "*", tokens.Scope.READ, None, 1_700_000_000),
    ]
    out = []
    for claim in claims:
        token = tokens.issue(SECRET, claim)
        out.append(b"\x00" + token.encode())
        header, payload, _ = token.split(".")
        raw = [_unb64(header), _unb64(payload)]
        assert signed(*raw)  # the signed form of the same token
        out.append(b"\x01" + raw[0] + b"\0" + raw[1])
    out.append(b"\x01" + json.dumps({"alg": "HS256", "typ": "JWT"}).encode() + b"\0{}")
    for word in (b"30d", b"never", b"12h", b"admin", b"0123456789abcdef"):
        out.append(b"\x00" + word)
    return out


def _unb64(part: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def path_seeds() -> list[bytes]:
    key = "0" * 64
    targets = [
        f"main/sccache/linux-x86_64/a/b/c/{key}",
        "main/sccache/linux-x86_64/.sccache_check",
        "main/sccache/",
        "main/sccache/a//b/%2e%2e/c",
        "main/log/8d75r5khhcwsm6gfk7rc4zgdj1184za2-larder-note.txt.drv",
        "main/realisations/sha256:0qmrn0s85dpvbdd8m6z29hxl8hn6gh2kp198fbk7n3dn5j8pjwh3!out.doi",
        "main/8d75r5khhcwsm6gfk7rc4zgdj1184za2.narinfo",
        "main/8d75r5khhcwsm6gfk7rc4zgdj1184za2.ls",
        "main/nar/0yiyqp8m0zhd7dmb5ywr4477vh3jxlwxh5m3kirh3hhg90gwdc1q.nar.xz",
        f"main/rustc/blobs/{key}",
        "main/debuginfo/0123abcd",
        "pr-1/log/a%3Fb.drv",
    ]
    return [bytes([method]) + t.encode() for method in (0, 1) for t in targets] + [
        b"\x04main/sccache/a/b/",
        b"\x05main/sccache/a/b/",
    ]


def head_seeds() -> list[bytes]:
    from fuzz.request_heads import HELD, MISSING

    held = f"GET /main/{HELD}.narinfo HTTP/1.1\r\nHost: x\r\n".encode()
    nix = (
        b"Host: cache\r\nUser-Agent: curl/8.14.1 Nix/2.34.0\r\nAccept: */*\r\n"
        b"Accept-Encoding: deflate, gzip, br, zstd\r\n"
    )
    smuggled = b"GET /main/nix-cache-info?smuggled=1 HTTP/1.1\r\nHost: x\r\n\r\n"
    length = str(len(smuggled)).encode()
    whole = held + b"\r\n"
    heads = [
        held + b"\r\n",
        held + b"\r\n" + held + b"\r\n",
        f"GET /main/{MISSING}.narinfo HTTP/1.1\r\n".encode() + nix + b"\r\n",
        f"HEAD /main/{HELD}.narinfo HTTP/1.1\r\n".encode() + nix + b"\r\n",
        b"GET /main/nix-cache-info HTTP/1.1\r\n" + nix + b"\r\n",
        b"GET /main/nar/" + b"0" * 52 + b".nar.zst HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /nope/nix-cache-info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        held + b"Content-Length : " + length + b"\r\n\r\n" + smuggled,
        held + b"Transfer-Encoding\t: chunked\r\n\r\n" + smuggled,
        held + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n" + held + b"\r\n",
        held + b"Content-Length: " + length + b"\r\n\r\n" + smuggled,
        held + b"X-A: b\nContent-Length: 3\r\n\r\nabc",
        held + b"Referer: r\r\nUser-Agent: u\r\nConnection: keep-alive\r\n\r\n",
        held + b"Expect: 100-continue\r\n\r\n",
        f"GET /main/{HELD}.narinfo HTTP/1.0\r\n\r\n".encode(),
        b"PUT /main/x.narinfo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nab" + held + b"\r\n",
    ]
    again = [  # two reads of one head each: the second may be answered without reading it again
        whole + whole,
        whole + held + b"X-A: b\r\n\r\n",
        whole + whole.replace(b"GET", b"HEAD", 1),
        whole + whole.replace(HELD.encode(), MISSING.encode()),
        whole + whole.replace(b"Host: x", b"Host: x\r\nConnection: close"),
    ]
    heads.append(whole * 40)  # past the heads kept read: the rest are read again in turn
    heads.append(whole * 36 + held + b"Content-Length: 3\r\n\r\nabc" + whole)
    return [bytes([cut]) + head for cut in (0, 40) for head in heads] + [
        bytes([len(whole)]) + pair for pair in again
    ]


CARGO_LIB = [
    "--crate-name", "hex", "--edition=2018", "/h/.cargo/registry/src/idx/hex-0.4.3/src/lib.rs",
    "--error-format=json", "--json=diagnostic-rendered-ansi,artifacts,future-incompat",
    "--cap-lints", "allow", "--crate-type", "lib", "--emit=dep-info,metadata,link",
    "-C", "opt-level=3", "-C", "metadata=5e1f", "-C", "extra-filename=-5e1f",
    "--out-dir", "/w/app/target/release/deps", "-L", "dependency=/w/app/target/release/deps",
    "--cfg", 'feature="std"',
]  # fmt: skip


def args_seeds() -> list[bytes]:
    lines = [
        CARGO_LIB,
        [*CARGO_LIB, "-C", "incremental=/w/target/debug/incremental"],
        ["-vV"],
        ["-", "--crate-name", "___", "--print=file-names", "--crate-type", "bin"],
        ["--crate-name", "build_script_build", "build.rs", "--crate-type", "bin", "-o", "x"],
        ["--crate-name", "s", "src/lib.rs", "--crate-type", "staticlib", "@args.txt"],
    ]
    return ["\0".join(line).encode() for line in lines]


def depinfo_seeds() -> list[bytes]:
    return [
        b"/w/app/target/debug/deps/leaf-1a2b.d: src/lib.rs src/util.rs\n\nsrc/lib.rs:\n"
        b"src/util.rs:\n\n# env-dep:CARGO_PKG_VERSION=0.1.0\n# env-dep:LARDER_DEMO_GREETING\n",
        b"/w/t/deps/generated-0d7b.d: crates/generated/src/lib.rs /w/t/build/g-1/out/sq.rs\n\n"
        b"# env-dep:OUT_DIR=/w/app/target/build/g-1/out\n# env-dep:MULTI=a\\nb\n",
        b"out.d: src/my\\ file.rs /h/.cargo/registry/src/x/lib.rs\n\nsrc/my\\ file.rs:\n",
        b"# checksum:sha256=abc\n",
    ]


def inputs_seeds() -> list[bytes]:
    identity = {
        "package": "leaf", "crate": "leaf", "version": "0.1.0", "crate_type": "lib",
        "target": "x86_64-unknown-linux-gnu",
    }  # fmt: skip
    fields = {
        "format": "larder-rustc/1", "rustc": "rustc 1.85.0\nhost: x86_64-unknown-linux-gnu\n",
        "sysroot": [["libstd.rlib", "aa"]], "args": ["--crate-name=leaf", "-C=opt-level=0"],
        "sources": [["crates/leaf/src/lib.rs", "11"]], "env_deps": [["X", {"blake3": "22"}]],
        "externs": [["itoa", "33"]], "cargo_env": [], "out_dir": [], "native": [],
        "link": {"line": ["cc"], "inputs": [["crt1.o", "44"]]},
    }  # fmt: skip
    document = json.dumps({"version": 1, "identity": identity, "inputs": fields}).encode()
    stored = b"larder-inputs/1 " + b"a" * 64 + b"\n" + zstandard.compress(document)
    changed = dict(fields, args=["--crate-name=leaf", '--cfg=feature="x"'], externs=[])
    return [
        b"\x00" + document,
        b"\x01" + stored,
        b'\x02{"keys":[{"key":"' + b"a" * 64 + b'","stored":1}]}',
        b'\x03{"crate":"leaf","category":"source"}',
        b"\x04" + json.dumps(fields).encode() + b"\0" + json.dumps(changed).encode(),
    ]


def all_seeds(fixtures: Path) -> dict[str, dict[str, bytes]]:
    """Seeds by target name."""
    return {
        "narinfo": _named(narinfo_seeds(fixtures)),
        "nar": _named(nar_seeds(fixtures)),
        "tokens": _named(token_seeds()),
        "request_paths": _named(path_seeds()),
        "request_heads": _named(head_seeds()),
        "client_args": _named(args_seeds()),
        "client_depinfo": _named(depinfo_seeds()),
        "rustc_inputs": _named(inputs_seeds()),
    }
