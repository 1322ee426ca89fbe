"""Content-addressed store paths (``CA:`` in their narinfo) of every kind the real Nix clients
make are pushed and substituted whole; larder checks each ``CA`` makes its store path."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import pytest

from larder.protocol.content_address import store_hash_of
from larder.protocol.storepath import StorePath
from tests.e2e.harness import http, larder_server
from tests.e2e.nix import Nix, NixVersion, netrc_for

pytestmark = pytest.mark.nix

# A content-addressed derivation whose output refers to itself and to a path added by hash.
CA_DRV = """
derivation {
  name = "ca-self";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" ''
    export PATH=/usr/bin:/bin; mkdir $out; echo $out > $out/self
    cat @DEP@/a > $out/dep; echo @NONCE@ > $out/n
  '' ];
  __contentAddressed = true;
  outputHashMode = "recursive";
  outputHashAlgo = "sha256";
}
"""


def make_paths(ci: Nix, tmp: Path) -> dict[str, str]:
    """Paths of each content-address kind, made by ``ci``'s Nix."""
    nonce = uuid.uuid4().hex
    tree = tmp / "tree"
    tree.mkdir()
    (tree / "a").write_text(nonce)
    flat = tmp / "flat.txt"
    flat.write_text(nonce + "\n")
    add = ci.run
    paths = {
        "fixed:r:sha256": add("nix-store", "--add", str(tree)).stdout.strip(),
        "fixed:sha256": add("nix-store", "--add-fixed", "sha256", str(flat)).stdout.strip(),
        "fixed:sha1": add("nix-store", "--add-fixed", "sha1", str(flat)).stdout.strip(),
        "fixed:r:sha1": add(
            "nix-store", "--add-fixed", "--recursive", "sha1", str(tree)
        ).stdout.strip(),
    }
    refs = " ".join(f"${{builtins.storePath {p}}}" for p in list(paths.values())[:2])
    text = add("nix-instantiate", "--eval", "--read-write-mode", "-E",
               f'builtins.toFile "with-refs" "{refs}"')  # fmt: skip
    paths["text"] = json.loads(text.stdout)
    expr = tmp / "ca.nix"
    expr.write_text(CA_DRV.replace("@DEP@", paths["fixed:r:sha256"]).replace("@NONCE@", nonce))
    built = add("nix-build", str(expr), "--no-out-link", "--option", "extra-experimental-features",
                "ca-derivations")  # fmt: skip
    paths["ca-derivation"] = built.stdout.strip().splitlines()[-1]
    return paths


def test_content_addressed_paths_push_and_substitute(
    tmp_path: Path, nix_version: NixVersion
) -> None:
    with larder_server(str(tmp_path / "data"), tmp_path) as server:
        ci = Nix(tmp_path / "ci", netrc=netrc_for(server.token()), version=nix_version)
        paths = make_paths(ci, tmp_path)
        infos = json.loads(ci.run("nix", "path-info", "--json", *paths.values()).stdout)
        if isinstance(infos, dict):  # newer Nix: keyed by path
            infos = [{"path": path, **info} for path, info in infos.items()]
        by_path = {info["path"]: info for info in infos}
        for kind, path in paths.items():
            ca = by_path[path]["ca"]
            assert ca.startswith(kind.split("-")[0] if kind != "ca-derivation" else "fixed:r:")
            own = StorePath.parse(path)
            refs = [StorePath.parse(r) if r.startswith("/") else StorePath.parse_base(r)
                    for r in by_path[path]["references"]]  # fmt: skip
            assert store_hash_of(ca, own.name, refs, own.hash) == own.hash, (kind, ca)
        ca_self = StorePath.parse(paths["ca-derivation"])
        assert any(ca_self.hash in r for r in by_path[paths["ca-derivation"]]["references"])
        dumps = {path: hashlib.sha256(ci.dump(path)).digest() for path in paths.values()}

        ci.copy_to(f"{server.url}/main", *paths.values())
        for path in paths.values():
            status, body = http("GET", f"{server.url}/main/{Path(path).name[:32]}.narinfo")
            assert status == 200 and b"\nCA: " in body, body

        info = server.cache_info()
        laptop = Nix(tmp_path / "laptop", version=nix_version)
        for path in paths.values():
            laptop.substitute(str(info["substituter"]), str(info["public_key"]), path)
            assert hashlib.sha256(laptop.dump(path)).digest() == dumps[path], path
