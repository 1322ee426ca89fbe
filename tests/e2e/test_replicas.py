"""Several `larder serve` processes: replicas on one bucket, and a server killed mid-upload."""

from __future__ import annotations

import hashlib
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import zstandard

from larder.protocol import nix32
from larder.protocol.nar import write_nar
from tests.e2e.harness import S3_ENV, http, larder_server, make_bucket, moto_server, start_put
from tests.e2e.nix import Nix, NixVersion, netrc_for
from tests.wait import wait_until

pytestmark = pytest.mark.nix


def test_first_start_prints_substituter_key_and_token_command(tmp_path: Path) -> None:
    with larder_server(str(tmp_path / "data"), tmp_path) as server:
        info = server.cache_info()
        log = server.log()
    assert "created cache 'main'" in log
    assert f"substituter {server.url}/main" in log
    assert f"trusted-public-keys: {info['public_key']}" in log
    assert "larder token create" in log and "--scope write" in log


def test_replicas_on_one_bucket_share_uploads_tokens_and_revocations(
    tmp_path: Path, nix_version: NixVersion
) -> None:
    with moto_server() as endpoint:
        make_bucket(endpoint, "shared")
        env = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint, "LARDER_REFRESH_INTERVAL": "0.5"}
        with (
            larder_server("s3://shared/x", tmp_path, env) as one,
            larder_server("s3://shared/x", tmp_path, env) as two,
        ):
            assert one.cache_info()["public_key"] == two.cache_info()["public_key"]
            token = one.token()  # minted against the bucket, valid on every replica
            ci = Nix(tmp_path / "ci", netrc=netrc_for(token), version=nix_version)
            paths = ci.build_closure(tmp_path)
            ci.copy_to(f"{one.url}/main", paths["app"])
            closure = ci.closure(paths["app"])
            ci.delete(*reversed(closure))
            laptop = Nix(tmp_path / "laptop", version=nix_version)
            laptop.substitute(f"{two.url}/main", str(two.cache_info()["public_key"]), paths["app"])
            assert all(laptop.exists(path) for path in closure)

            # A write token made through replica two's storage works on replica one ...
            body = b"opaque build log"
            status, _ = http("PUT", f"{one.url}/main/log/x.drv", body, two.token())
            assert status == 200
            assert http("GET", f"{two.url}/main/log/x.drv") == (200, body)
            # ... and a revocation recorded once reaches both replicas.
            revocable, token_id = one.token_with_id()
            for replica in (one, two):
                assert http("PUT", f"{replica.url}/main/log/y.drv", body, revocable)[0] == 200
            two.cli("token", "revoke", token_id)
            # Both replicas re-read revocations every LARDER_REFRESH_INTERVAL.
            wait_until(
                lambda: all(
                    http("PUT", f"{r.url}/main/log/probe.drv", body, revocable)[0] == 401
                    for r in (one, two)
                ),
                what="the revocation reaching both replicas",
            )
            for replica in (one, two):
                assert http("PUT", f"{replica.url}/main/log/z.drv", body, revocable)[0] == 401
            assert http("GET", f"{one.url}/main/log/z.drv")[0] == 404


def _partial(tmp: Path) -> list[Path]:
    """Temporary objects that already hold bytes (not the reserve a disk store keeps)."""
    if not tmp.is_dir():
        return []
    return [p for p in tmp.iterdir() if p.stat().st_size > 0 and p.name != "reserve"]


def test_server_killed_mid_upload_leaves_nothing_visible(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    nar = write_nar({"type": "regular", "contents": os.urandom(8 * 1024 * 1024)})
    file_hash = nix32.encode(hashlib.sha256(nar).digest())
    with larder_server(data, tmp_path) as server:
        conn = start_put(
            server.url, f"/main/nar/{file_hash}.nar", server.token(), nar, len(nar) // 2
        )
        # The server has streamed part of the upload into its temporary object.
        wait_until(lambda: _partial(Path(data) / "tmp"), what="the upload starting to stream")
        os.kill(server.pid, signal.SIGKILL)
        conn.close()
    with larder_server(data, tmp_path) as server:
        assert http("GET", f"{server.url}/main/nar/{file_hash}.nar")[0] == 404
        assert http("HEAD", f"{server.url}/main/nar/{file_hash}.nar")[0] == 404
    committed = [p for p in (Path(data) / "blobs").rglob("*") if p.is_file()]
    assert committed == []


def test_replicas_racing_on_one_narinfo_end_consistent(tmp_path: Path) -> None:
    nar = write_nar({"type": "regular", "contents": os.urandom(100_000)})
    digest = nix32.encode(hashlib.sha256(nar).digest())
    store_hash = nix32.encode(hashlib.sha256(b"racing").digest()[:20])
    with moto_server() as endpoint:
        make_bucket(endpoint, "race")
        env = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint, "LARDER_REFRESH_INTERVAL": "0.5"}
        with (
            larder_server("s3://race/x", tmp_path, env) as one,
            larder_server("s3://race/x", tmp_path, env) as two,
        ):
            token = one.token()
            replicas = [one, two]

            def upload(n: int) -> tuple[int, int]:
                url = replicas[n % 2].url
                nar_status, _ = http("PUT", f"{url}/main/nar/{digest}.nar", nar, token)
                narinfo = (
                    f"StorePath: /nix/store/{store_hash}-rust_race-1.0.0\n"
                    f"URL: nar/{digest}.nar\nCompression: none\nNarHash: sha256:{digest}\n"
                    f"NarSize: {len(nar)}\nReferences: \nDeriver: {'a' * 32}-v{n}.drv\n"
                ).encode()
                info_status, _ = http("PUT", f"{url}/main/{store_hash}.narinfo", narinfo, token)
                return nar_status, info_status

            with ThreadPoolExecutor(16) as pool:
                results = list(pool.map(upload, range(40)))
            assert results == [(200, 200)] * 40

            def agreed() -> list[tuple[int, bytes]] | None:
                served = [http("GET", f"{r.url}/main/{store_hash}.narinfo") for r in replicas]
                return served if served[0] == served[1] and served[0][0] == 200 else None

            # Within refresh_interval (0.5 s) both replicas read the store again.
            served = wait_until(agreed, what="both replicas serving the same narinfo")
            text = served[0][1].decode()
            assert text.count("Deriver: ") == 1 and text.count("StorePath: ") == 1
            url = next(line[5:] for line in text.splitlines() if line.startswith("URL: "))
            status, body = http("GET", f"{two.url}/main/{url}")
            assert status == 200
            assert zstandard.ZstdDecompressor().decompressobj().decompress(body) == nar
