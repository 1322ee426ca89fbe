"""Garbage collection with the real Nix client, on disk and on S3 (a moto server).

Three closures are pushed with ``nix copy``, a laptop substitutes the oldest (so it counts as
used), ``larder gc`` runs as its own process with a cap one byte under the store's size: the
least recently used closure goes whole, the others stay whole and real Nix substitutes them.
On disk, uploads also race collections: every upload Nix reports as done stays whole.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from larder.core import keys
from larder.protocol import narinfo
from larder.storage.s3 import S3Storage
from tests.e2e.harness import (
    LARDER,
    S3_ENV,
    Larder,
    http,
    larder_server,
    make_bucket,
    moto_server,
    s3_client,
)
from tests.e2e.nix import Nix, NixVersion, netrc_for
from tests.wait import wait_until

pytestmark = pytest.mark.nix

SERVER_ENV = {
    "LARDER_GC_INTERVAL": "0",  # collections run from the command line here
    "LARDER_GC_GRACE": "1",
    "LARDER_USE_FLUSH_INTERVAL": "0.2",
    "LARDER_REFRESH_INTERVAL": "0.3",  # how long a replica may serve what another deleted
}


@pytest.fixture(params=["disk", "s3"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Larder]:
    if request.param == "disk":
        with larder_server(str(tmp_path / "data"), tmp_path, SERVER_ENV) as larder:
            yield larder
        return
    with moto_server() as endpoint:
        make_bucket(endpoint, "larder-gc")
        env = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint, **SERVER_ENV}
        with larder_server("s3://larder-gc/cache", tmp_path, env) as larder:
            yield larder


def gc(server: Larder, *args: str) -> dict[str, object]:
    done = server.run_cli("gc", "--grace", "1", "--json", *args)
    return dict(json.loads(done.stdout))


def served(server: Larder, path: str) -> narinfo.NarInfo | None:
    status, body = http("GET", f"{server.url}/main/{Path(path).name[:32]}.narinfo")
    return narinfo.parse(body) if status == 200 else None


def whole(server: Larder, path: str) -> bool:
    """The narinfo, its NAR and the same for every reference answer 200."""
    todo, seen = [path], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        info = served(server, current)
        if info is None or http("HEAD", f"{server.url}/main/{info.url}")[0] != 200:
            return False
        todo += [ref.full for ref in info.references]
    return True


def test_the_least_recently_used_closure_goes_whole(
    server: Larder, tmp_path: Path, nix_version: NixVersion
) -> None:
    ci = Nix(tmp_path / "ci", netrc=netrc_for(server.token()), version=nix_version)
    closures, tops, nar_urls = {}, {}, {}
    for label in ("a", "b", "c"):
        (tmp_path / label).mkdir()
        paths = ci.build_closure(tmp_path / label)
        ci.copy_to(f"{server.url}/main", paths["app"])
        closures[label], tops[label] = ci.closure(paths["app"]), paths["app"]
        # Reading them is a use too. The top path last: its closure is then used as one (uses
        # are dated to the second on S3, and a dependency read a second after the top would
        # count as used later, and stay when the top goes).
        for path in sorted(closures[label], key=lambda path: path == paths["app"]):
            nar_urls[path] = served(server, path).url  # type: ignore[union-attr]
        # Time must pass, not a condition: S3 dates objects and uses to the second.
        time.sleep(1.1)

    # A laptop substitutes A, the oldest push: now A is the most recently used.
    ci.delete(*reversed(closures["a"]))
    key = str(server.cache_info()["public_key"])
    Nix(tmp_path / "laptop", version=nix_version).substitute(f"{server.url}/main", key, tops["a"])
    # Time must pass, not a condition: every use older than the grace (1 s), at S3's
    # one-second resolution (the uses themselves are written every 0.2 s).
    time.sleep(1.5)

    size = gc(server, "--dry-run")["caches"]["main"]["size_before"]  # type: ignore[index]
    report = gc(server, "--max-size", str(size - 1))
    assert report["caches"]["main"]["size_after"] <= size - 1  # type: ignore[index]
    assert report["blobs_reaped"] == 3, json.dumps(report)[:3000]
    # The server forgets what it remembered of the deleted narinfos (refresh_interval).
    wait_until(
        lambda: all(served(server, path) is None for path in closures["b"]),
        what="the least recently used closure no longer served",
    )
    for path in closures["b"]:
        assert http("HEAD", f"{server.url}/main/{nar_urls[path]}")[0] == 404
    for path in closures["a"] + closures["c"]:
        assert whole(server, path), f"{path} lost part of its closure"
    again = gc(server, "--dry-run", "--max-size", str(size - 1))
    assert again["caches"]["main"]["size_before"] <= size - 1  # type: ignore[index]
    assert again["evicted_objects"] == 0

    # A fresh machine substitutes what stayed, from the cache alone.
    ci.delete(*reversed(closures["a"] + closures["c"]))
    fresh = Nix(tmp_path / "fresh", version=nix_version)
    for label in ("a", "c"):
        fresh.substitute(f"{server.url}/main", key, tops[label])
        assert all(fresh.exists(path) for path in closures[label])
    ci.delete(*reversed(closures["b"]))
    missing = fresh.substitute(f"{server.url}/main", key, tops["b"], check=False)
    assert missing.returncode != 0
    assert not any(fresh.exists(path) for path in closures["b"])


DEPENDENT_NIX = r"""
derivation {
  name = "rust_bin-@NONCE@";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" (
    "export PATH=/usr/bin:/bin; mkdir -p $out; echo ${builtins.storePath @DEP@} > $out/dep; "
    + "head -c 20000 /dev/urandom > $out/data") ];
}
"""


def age_everything(data: Path, seconds: float) -> None:
    """Date every object and blob ``seconds`` back and forget every recorded use."""
    when = time.time() - seconds
    for root in (data / "objects" / "caches", data / "blobs"):
        for path in root.rglob("*"):
            if path.is_file():
                os.utime(path, (when, when))
    for path in (data / "objects" / "gc").glob("use*/**/*"):
        if path.is_file():
            path.unlink()


def test_uploads_racing_collections_are_never_lost(tmp_path: Path, nix_version: NixVersion) -> None:
    data = tmp_path / "data"
    env = {**SERVER_ENV, "LARDER_GC_GRACE": "30"}
    with larder_server(str(data), tmp_path, env) as server:
        ci = Nix(tmp_path / "ci", netrc=netrc_for(server.token()), version=nix_version)
        (tmp_path / "old").mkdir()
        old = ci.build_closure(tmp_path / "old")
        ci.copy_to(f"{server.url}/main", old["app"])
        outcomes = []
        for round_ in range(5):
            age_everything(data, 3600)  # everything there may go
            expr = tmp_path / f"dep{round_}.nix"
            expr.write_text(
                DEPENDENT_NIX.replace("@NONCE@", uuid.uuid4().hex[:8]).replace(
                    "@DEP@", f'"{old["leaf"]}"'
                )
            )
            built = ci.run("nix-build", str(expr), "--no-out-link").stdout.split()[-1]
            reports: list[subprocess.CompletedProcess[str]] = []
            collection = threading.Thread(
                target=lambda reports=reports: reports.append(
                    subprocess.run(
                        [*LARDER, "gc", "--storage", str(data), "--max-size", "1",
                         "--grace", "30", "--json"],
                        env=server.env, capture_output=True, text=True, check=True,
                    )
                )
            )  # fmt: skip
            collection.start()
            time.sleep(0.4 * round_)  # land the upload at different points of the run
            copied = ci.copy_to(f"{server.url}/main", built, check=False)
            collection.join()
            # Not a condition: a stale memory of the deleted narinfos would make `whole` true
            # too, so let the server's memory of them run out (refresh_interval) first.
            time.sleep(0.5)
            report = json.loads(reports[0].stdout)
            if copied.returncode == 0:
                assert whole(server, built), f"round {round_}: an accepted upload lost its closure"
            outcomes.append((copied.returncode, report["evicted_objects"], report["restored"]))
        # Nix may fail loudly (a reference it saw went before its upload), never succeed broken;
        # and the collections really ran beside the uploads, evicting what was old.
        assert [rc for rc, _, _ in outcomes].count(0) >= 1, outcomes
        assert sum(evicted for _, evicted, _ in outcomes) > 0, outcomes


def metric_sum(url: str, name: str) -> float:
    status, body = http("GET", f"{url}/metrics")
    assert status == 200
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in body.decode().splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


async def stored_closures(endpoint: str) -> tuple[int, list[str]]:
    """From the bucket itself (a GET would count as a use): how many narinfos are stored, and
    those whose NAR record, blob or references' narinfos are missing."""
    storage = S3Storage("shared-gc", "x/", endpoint_url=endpoint, max_attempts=2)
    broken = []
    try:
        stored = [key async for key in storage.keys(keys.narinfo_prefix("main"))]
        for key in stored:
            data = await storage.get(key)
            if data is None:
                continue  # evicted while we looked
            info = narinfo.parse(data)
            record = await storage.get(keys.nar("main", info.nar_hash.nix32()))
            refs = [keys.narinfo("main", ref.hash) for ref in info.references]
            if (
                record is None
                or await storage.blob_stored_size(json.loads(record)["blob"]) is None
                or not all([await storage.exists(ref) for ref in refs])
            ) and await storage.exists(key):
                # Still there after what it needs went: broken. (Gone by now means a
                # collection took it first and the rest after, as it must, while we read.)
                broken.append(key)
        return len(stored), broken
    finally:
        await storage.close()


def test_two_replicas_collecting_one_bucket_stay_consistent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nix_version: NixVersion
) -> None:
    for name, value in S3_ENV.items():  # this process looks into the bucket too
        monkeypatch.setenv(name, value)
    with moto_server() as endpoint:
        make_bucket(endpoint, "shared-gc")
        env = {
            **S3_ENV,
            "AWS_ENDPOINT_URL": endpoint,
            **SERVER_ENV,
            "LARDER_GC_INTERVAL": "1",  # both replicas try every second; one at a time runs
            "LARDER_GC_GRACE": "3",
            "LARDER_GC_MAX_SIZE": "1",  # evict whatever is older than the grace
        }
        with (
            larder_server("s3://shared-gc/x", tmp_path, env) as one,
            larder_server("s3://shared-gc/x", tmp_path, env) as two,
        ):
            ci = Nix(tmp_path / "ci", netrc=netrc_for(one.token()), version=nix_version)
            for label in ("a", "b"):
                (tmp_path / label).mkdir()
                paths = ci.build_closure(tmp_path / label)
                ci.copy_to(f"{one.url}/main", paths["app"])
                assert whole(two, paths["app"]), "a fresh upload was not whole on the other replica"
            deadline = time.monotonic() + 60
            while True:  # at any moment every stored narinfo is whole; in the end none is left
                left, broken = asyncio.run(stored_closures(endpoint))
                assert not broken, f"half-evicted closures: {broken}"
                if left == 0:
                    break
                assert time.monotonic() < deadline, "the replicas never collected the old paths"
                time.sleep(0.3)
            completed = sum(
                metric_sum(r.url, 'larder_gc_runs_total{result="completed"}') for r in (one, two)
            )
            failed = sum(
                metric_sum(r.url, 'larder_gc_runs_total{result="failed"}') for r in (one, two)
            )
            assert completed >= 1 and failed == 0


def damage_nar(server: Larder, path: str) -> None:
    """Cut the stored NAR blob of ``path`` to half its bytes, on disk or in the bucket."""
    info = served(server, path)
    assert info is not None
    record_key = keys.nar("main", info.nar_hash.nix32())
    if server.storage.startswith("s3://"):
        bucket, prefix = server.storage.removeprefix("s3://").split("/", 1)
        client = s3_client(server.env["AWS_ENDPOINT_URL"])
        record = client.get_object(Bucket=bucket, Key=f"{prefix}/objects/{record_key}")
        blob_id = json.loads(record["Body"].read())["blob"]
        blob_key = f"{prefix}/blobs/{blob_id[:2]}/{blob_id}"
        stored = client.get_object(Bucket=bucket, Key=blob_key)["Body"].read()
        client.put_object(Bucket=bucket, Key=blob_key, Body=stored[: len(stored) // 2])
        return
    data = Path(server.storage)
    blob_id = json.loads((data / "objects" / record_key).read_text())["blob"]
    blob = next((data / "blobs").rglob(blob_id))
    blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])


def verify(server: Larder, *args: str) -> tuple[int, dict[str, object]]:
    done = subprocess.run(
        [*LARDER, "verify", "--json", *args, "--storage", server.storage],
        env=server.env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, dict(json.loads(done.stdout))


def test_a_path_damaged_at_rest_is_pushed_again_after_verify_repair(
    server: Larder, tmp_path: Path, nix_version: NixVersion
) -> None:
    ci = Nix(tmp_path / "ci", netrc=netrc_for(server.token()), version=nix_version)
    paths = ci.build_closure(tmp_path)
    ci.copy_to(f"{server.url}/main", paths["app"])
    assert verify(server)[0] == 0
    damage_nar(server, paths["mid"])
    mid_key = keys.narinfo("main", Path(paths["mid"]).name[:32])

    code, report = verify(server)
    assert code == 1 and mid_key in report["damaged_objects"]  # type: ignore[operator]
    assert served(server, paths["mid"]) is not None  # nothing changed
    code, report = verify(server, "--repair")
    assert code == 1 and mid_key in report["removed"]  # type: ignore[operator]
    wait_until(lambda: served(server, paths["mid"]) is None, what="the damaged path is missing")

    # The runner that pushed it remembers it (narinfo-cache-positive-ttl, 30 days by default).
    ci.run("nix", "copy", "--to", f"{server.url}/main", paths["app"],
           "--option", "narinfo-cache-positive-ttl", "0")  # fmt: skip
    assert whole(server, paths["app"])
    code, report = verify(server)
    assert code == 0 and report["blobs"] == 3
    ci.delete(paths["app"], paths["mid"], paths["leaf"])
    key = str(server.cache_info()["public_key"])
    laptop = Nix(tmp_path / "laptop", version=nix_version)
    laptop.substitute(f"{server.url}/main", key, paths["app"])
    assert all(laptop.exists(path) for path in paths.values())
