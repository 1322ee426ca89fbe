"""What a current Nix does against larder beyond push and substitute: compressed uploads
(``narinfo-compression``, ``ls-compression``, ``log-compression``), NAR listings and debug-info
indexes, ``nix log``, ``nix store sign`` and copies out of larder (which re-serialise narinfos
and need their FileHash), and no NAR uploaded twice. Runs with Nix 2.8 and sid's Nix; the
store options that 2.8 lacks are used with sid's only."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from larder.protocol import narinfo
from tests.e2e.harness import Larder, http, larder_server
from tests.e2e.nix import SID, Nix, NixVersion, netrc_for

pytestmark = pytest.mark.nix

# A crate-like output with a build log line, a debug file named by its build id, and a twin
# whose contents (so whose NAR) are the same under another name.
BUILD_NIX = r"""
let
  mk = name: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" ''
      export PATH=/usr/bin:/bin
      echo "Compiling rust_dbg v0.1.0 @NONCE@"
      mkdir -p $out/lib/debug/.build-id/ab
      echo @NONCE@ > $out/lib/debug/.build-id/ab/@BUILDID@.debug
      echo @NONCE@ > $out/lib/librust_dbg.rlib
    '' ];
  };
in { one = mk "rust_dbg-0.1.0"; twin = mk "rust_dbg-twin-0.1.0"; }
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Larder]:
    with larder_server(str(tmp_path / "data"), tmp_path) as larder:
        yield larder


def build(nix: Nix, workdir: Path) -> tuple[dict[str, str], str]:
    nonce = uuid.uuid4().hex
    build_id = (nonce + nonce)[:38]
    expr = workdir / "dbg.nix"
    expr.write_text(BUILD_NIX.replace("@NONCE@", nonce).replace("@BUILDID@", build_id))
    paths = {}
    for attr in ("one", "twin"):
        out = nix.run("nix-build", str(expr), "-A", attr, "--no-out-link")
        paths[attr] = out.stdout.strip().splitlines()[-1]
    return paths, "ab" + build_id


def access_lines(server: Larder, method: str, fragment: str) -> list[str]:
    """Access log lines of ``method`` requests whose line holds ``fragment``, once the log has
    stopped growing (it is written in batches every 50 ms)."""
    size, deadline = -1, time.monotonic() + 5
    while (now := len(server.log())) != size and time.monotonic() < deadline:
        size = now
        time.sleep(0.25)
    lines = server.log().splitlines()
    return [line for line in lines if f'"{method} ' in line and fragment in line]


@pytest.mark.parametrize("coding", ["xz", "bzip2", "br", "zstd", "gzip"])
def test_compressed_uploads_listings_logs_and_debug_info(
    server: Larder, tmp_path: Path, coding: str
) -> None:
    SID.check()
    ci = Nix(tmp_path / "ci", netrc=netrc_for(server.token()), version=SID)
    paths, build_id = build(ci, tmp_path)
    options = (
        f"narinfo-compression={coding}&ls-compression={coding}&log-compression={coding}"
        "&write-nar-listing=true&index-debug-info=true&compression=xz"
    )
    ci.copy_to(f"{server.url}/main?{options}", paths["one"])
    ci.run("nix", "store", "copy-log", "--to", f"{server.url}/main?{options}", paths["one"])

    key = str(server.cache_info()["public_key"])
    laptop = Nix(tmp_path / "laptop", version=SID)
    laptop.substitute(f"{server.url}/main", key, paths["one"])
    assert laptop.dump(paths["one"]) == ci.dump(paths["one"])
    log = laptop.run("nix", "log", "--store", f"{server.url}/main", paths["one"]).stdout
    assert "Compiling rust_dbg v0.1.0" in log
    store_hash = Path(paths["one"]).name[:32]
    status, listing = http("GET", f"{server.url}/main/{store_hash}.ls")
    assert status == 200 and json.loads(listing)["root"]["type"] == "directory"
    status, body = http("GET", f"{server.url}/main/debuginfo/{build_id}.debug")
    assert status == 200, body
    archive = json.loads(body)["archive"]
    served = narinfo.parse(http("GET", f"{server.url}/main/{store_hash}.narinfo")[1])
    assert archive == "../" + served.url
    assert http("HEAD", f"{server.url}/main/{served.url}")[0] == 200


def test_sign_and_copy_out_of_larder(
    server: Larder, tmp_path: Path, nix_version: NixVersion
) -> None:
    ci = Nix(tmp_path / "ci", netrc=netrc_for(server.token()), version=nix_version)
    paths, _ = build(ci, tmp_path)
    ci.copy_to(f"{server.url}/main", paths["one"])
    key = str(server.cache_info()["public_key"])
    secret = tmp_path / "team.key"
    secret.write_text(ci.run("nix", "key", "generate-secret", "--key-name", "team-1").stdout)
    # Nix re-serialises each narinfo it signs or copies: it needs FileHash and FileSize.
    signer = Nix(tmp_path / "signer", netrc=netrc_for(server.token()), version=nix_version)
    signed = signer.run(
        "nix", "store", "sign", "--store", f"{server.url}/main", "--key-file", str(secret),
        paths["one"], check=False,
    )  # fmt: skip
    assert signed.returncode == 0, signed.stderr
    copier = Nix(tmp_path / "copier", version=nix_version)
    target = tmp_path / "elsewhere"
    copier.run(
        "nix", "copy", "--from", f"{server.url}/main", "--to", f"file://{target}",
        "--option", "trusted-public-keys", key, paths["one"],
    )  # fmt: skip
    copied = narinfo.parse((target / f"{Path(paths['one']).name[:32]}.narinfo").read_bytes())
    assert (
        copied.nar_hash
        == narinfo.parse(
            http("GET", f"{server.url}/main/{Path(paths['one']).name[:32]}.narinfo")[1]
        ).nar_hash
    )


# Not gzip: Nix's gzip stream carries the time it was written (libarchive's header), so two
# uploads of one NAR in different seconds have different FileHashes and Nix's HEAD of the
# second name cannot find the first (the test failed whenever the copies straddled a second).
@pytest.mark.parametrize("compression", ["xz", "zstd", "br", "bzip2", "none"])
def test_a_nar_larder_holds_is_not_uploaded_again(
    server: Larder, tmp_path: Path, compression: str
) -> None:
    SID.check()
    ci = Nix(tmp_path / "ci", netrc=netrc_for(server.token()), version=SID)
    paths, _ = build(ci, tmp_path)
    assert ci.dump(paths["one"]) == ci.dump(paths["twin"])  # two paths, one NAR
    url = f"{server.url}/main?compression={compression}"
    ci.copy_to(url, paths["one"])
    ci.copy_to(url, paths["twin"])
    puts = access_lines(server, "PUT", "/main/nar/")
    heads = access_lines(server, "HEAD", "/main/nar/")
    assert len(puts) == 1, puts
    assert any('" 200 ' in line for line in heads), heads
    laptop = Nix(tmp_path / "laptop", version=SID)
    key = str(server.cache_info()["public_key"])
    laptop.substitute(f"{server.url}/main", key, paths["twin"])
    assert laptop.exists(paths["twin"])


CA_NIX = r"""
derivation {
  name = "rust_ca-@NONCE@";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  __contentAddressed = true;
  outputHashMode = "recursive";
  outputHashAlgo = "sha256";
  args = [ "-c" "export PATH=/usr/bin:/bin; mkdir -p $out; echo @NONCE@ > $out/lib.rlib" ];
}
"""


def test_content_addressed_outputs_substitute_through_their_realisations(
    server: Larder, tmp_path: Path, nix_version: NixVersion
) -> None:
    """A content-addressed derivation's output is found by its realisation
    (``realisations/<drv hash>!out.doi``), which Nix uploads beside the narinfo."""
    expr = tmp_path / "ca.nix"
    expr.write_text(CA_NIX.replace("@NONCE@", uuid.uuid4().hex))
    feature = ("--extra-experimental-features", "ca-derivations")
    ci = Nix(tmp_path / "ci", netrc=netrc_for(server.token()), version=nix_version)
    out = ci.run("nix-build", *feature, str(expr), "--no-out-link").stdout.split()[-1]
    drv = ci.run("nix-instantiate", *feature, str(expr)).stdout.split()[-1]
    output = f"{drv}^out" if nix_version.own_store else drv  # 2.8 copies a .drv's outputs
    ci.run("nix", "copy", *feature, "--to", f"{server.url}/main", output)
    assert access_lines(server, "PUT", "/main/realisations/")
    ci.delete(out)  # with Debian's Nix the laptop shares this machine's store

    key = str(server.cache_info()["public_key"])
    laptop = Nix(tmp_path / "laptop", version=nix_version)
    built = laptop.run(
        "nix-build", *feature, str(expr), "--no-out-link",
        "--option", "substituters", f"{server.url}/main",
        "--option", "trusted-public-keys", key,
    )  # fmt: skip
    assert built.stdout.split()[-1] == out
    assert "building" not in built.stderr, built.stderr  # substituted, not built
    assert [line for line in access_lines(server, "GET", "/main/realisations/") if '" 200 ' in line]


def test_the_access_log_counts_the_bytes_of_a_nar_sent(server: Larder, tmp_path: Path) -> None:
    ci = Nix(tmp_path / "ci", netrc=netrc_for(server.token()))
    paths, _ = build(ci, tmp_path)
    ci.copy_to(f"{server.url}/main", paths["one"])
    store_hash = Path(paths["one"]).name[:32]
    served = narinfo.parse(http("GET", f"{server.url}/main/{store_hash}.narinfo")[1])
    status, nar = http("GET", f"{server.url}/main/{served.url}")
    assert status == 200
    lines = access_lines(server, "GET", served.url)
    assert lines, server.log()
    # aiohttp's %b: the bytes of the whole answer, its head included
    logged = int(lines[-1].split('" 200 ', 1)[1].split()[0])
    assert len(nar) < logged < len(nar) + 1024, (logged, len(nar))
