"""The real Nix client pushes a closure to a running larder and substitutes it back.

Runs on disk storage and on S3 (a moto server over real HTTP), each with Nix 2.8 and sid's
Nix (`make test` installs both); on CI a missing client is a failure, not a skip.
"""

from __future__ import annotations

import hashlib
import json
import lzma
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from larder.protocol import narinfo, nix32
from larder.protocol.signing import PublicKey
from tests.e2e.harness import S3_ENV, Larder, http, larder_server, make_bucket, moto_server
from tests.e2e.nix import Nix, NixVersion, netrc_for

pytestmark = pytest.mark.nix


@pytest.fixture(params=["disk", "s3"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Larder]:
    if request.param == "disk":
        with larder_server(str(tmp_path / "data"), tmp_path) as larder:
            yield larder
        return
    with moto_server() as endpoint:
        make_bucket(endpoint, "larder-e2e")
        env = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}
        with larder_server("s3://larder-e2e/cache", tmp_path, env) as larder:
            yield larder


def test_push_closure_then_substitute_on_a_fresh_machine(
    server: Larder, tmp_path: Path, nix_version: NixVersion
) -> None:
    ci = Nix(tmp_path / "ci", netrc=netrc_for(server.token()), version=nix_version)
    paths = ci.build_closure(tmp_path)
    closure = ci.closure(paths["app"])
    assert sorted(paths.values()) == closure
    dumps = {path: hashlib.sha256(ci.dump(path)).digest() for path in closure}

    ci.copy_to(f"{server.url}/main", paths["app"])
    ci.copy_to(f"{server.url}/main", paths["app"])  # a second push is a no-op, not an error

    info = server.cache_info()
    public_key = PublicKey.parse(str(info["public_key"]))
    for path in closure:
        status, body = http("GET", f"{server.url}/main/{Path(path).name[:32]}.narinfo")
        assert status == 200, body
        served = narinfo.parse(body)
        assert served.compression == "zstd"
        assert served.nar_hash.digest == dumps[path]
        assert any(public_key.verify(narinfo.fingerprint(served), sig) for sig in served.sigs)
        nar_status, nar = http("GET", f"{server.url}/main/{served.url}")
        assert nar_status == 200 and len(nar) == served.file_size

    ci.delete(*reversed(closure))
    laptop = Nix(tmp_path / "laptop", version=nix_version)
    laptop.substitute(str(info["substituter"]), str(info["public_key"]), paths["app"])
    app, mid, leaf = (laptop.real(paths[name]) for name in ("app", "mid", "leaf"))
    assert (app / "self").read_text().strip() == paths["app"]
    assert (app / "bin/app").stat().st_mode & 0o111
    assert (mid / "lib/link").readlink() == Path(paths["leaf"]) / "lib/libleaf.rlib"
    assert (leaf / "lib/random.bin").stat().st_size == 300000
    for path in closure:
        assert hashlib.sha256(laptop.dump(path)).digest() == dumps[path]

    # The readers (the laptop, the checks above) missed nothing; CI's pushes asked for each path
    # first, counted as the writer's, not as a miss of the cache's readers.
    lookups = narinfo_lookups(server.url)
    assert lookups[("miss", "reader")] == 0, lookups
    assert lookups[("hit", "reader")] >= 2 * len(closure), lookups
    assert lookups[("miss", "writer")] >= len(closure), lookups


def narinfo_lookups(url: str) -> dict[tuple[str, str], float]:
    """``larder_cache_lookups_total`` of cache main's narinfos by (result, role)."""
    status, body = http("GET", f"{url}/metrics")
    assert status == 200
    found: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "larder_cache_lookups_total" and (
                labels.get("kind") == "narinfo" and labels["cache"] == "main"
            ):
                found[(labels["result"], labels["role"])] = sample.value
    return found


def test_substitution_fails_without_the_cache_key(
    server: Larder, tmp_path: Path, nix_version: NixVersion
) -> None:
    ci = Nix(tmp_path / "ci", netrc=netrc_for(server.token()), version=nix_version)
    paths = ci.build_closure(tmp_path)
    ci.copy_to(f"{server.url}/main", paths["app"])
    ci.delete(*reversed(ci.closure(paths["app"])))
    laptop = Nix(tmp_path / "laptop", version=nix_version)
    other_key = "other-1:" + "A" * 43 + "="
    result = laptop.substitute(f"{server.url}/main", other_key, paths["leaf"], check=False)
    assert result.returncode != 0
    assert not laptop.exists(paths["leaf"])


def test_anonymous_push_is_refused_and_leaves_nothing(
    server: Larder, tmp_path: Path, nix_version: NixVersion
) -> None:
    anonymous = Nix(tmp_path / "anon", version=nix_version)
    paths = anonymous.build_closure(tmp_path)
    result = anonymous.copy_to(f"{server.url}/main", paths["leaf"], check=False)
    assert result.returncode != 0
    assert "401" in result.stderr
    status, _ = http("GET", f"{server.url}/main/{Path(paths['leaf']).name[:32]}.narinfo")
    assert status == 404


def test_narinfo_with_wrong_nar_hash_is_refused_and_never_served(
    server: Larder, tmp_path: Path, nix_version: NixVersion
) -> None:
    token = server.token()
    ci = Nix(tmp_path / "ci", version=nix_version)
    paths = ci.build_closure(tmp_path)
    leaf = paths["leaf"]
    nar = ci.dump(leaf)
    compressed = lzma.compress(nar)
    file_hash = nix32.encode(hashlib.sha256(compressed).digest())
    status, body = http("PUT", f"{server.url}/main/nar/{file_hash}.nar.xz", compressed, token)
    assert status == 200, body
    wrong = hashlib.sha256(nar + b"tampered").digest()
    store_hash = Path(leaf).name[:32]
    document = (
        f"StorePath: {leaf}\nURL: nar/{file_hash}.nar.xz\nCompression: xz\n"
        f"NarHash: sha256:{nix32.encode(wrong)}\nNarSize: {len(nar)}\nReferences: \n"
    ).encode()
    status, body = http("PUT", f"{server.url}/main/{store_hash}.narinfo", document, token)
    assert status == 400
    assert b"NarHash" in body
    assert http("GET", f"{server.url}/main/{store_hash}.narinfo")[0] == 404
    assert http("HEAD", f"{server.url}/main/{store_hash}.narinfo")[0] == 404


def test_a_private_cache_serves_only_readers_with_its_token(
    tmp_path: Path, nix_version: NixVersion
) -> None:
    """Nix sends netrc credentials as Basic auth: a read token of the cache substitutes, no
    token or another cache's token does not (and the failure is a clean "not substituted")."""
    with larder_server(str(tmp_path / "data"), tmp_path) as server:
        server.cli("cache", "create", "team", "--private")
        server.cli("cache", "create", "other", "--private")
        ci = Nix(tmp_path / "ci", netrc=netrc_for(server.token("team")), version=nix_version)
        paths = ci.build_closure(tmp_path)
        ci.copy_to(f"{server.url}/team", paths["app"])
        closure = ci.closure(paths["app"])
        ci.delete(*reversed(closure))
        key = json.loads(server.cli("cache", "show", "team"))["public_key"]
        for name, token in (("nobody", ""), ("stranger", server.token("other", "read"))):
            netrc = netrc_for(token) if token else ""
            outsider = Nix(tmp_path / name, netrc=netrc, version=nix_version)
            result = outsider.substitute(f"{server.url}/team", key, paths["leaf"], check=False)
            assert result.returncode != 0
            assert not outsider.exists(paths["leaf"])
        reader = Nix(
            tmp_path / "reader", netrc=netrc_for(server.token("team", "read")), version=nix_version
        )
        reader.substitute(f"{server.url}/team", key, paths["app"])
        assert all(reader.exists(path) for path in closure)
