"""The shim is never in the way: bad servers mean a local compile and a counted error."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import blake3
import pytest
import zstandard

from larder.protocol.rustc import Manifest, Output

RUSTC = shutil.which("rustc") or "rustc"


class FakeCache:
    """A misbehaving cache server: ``mode`` says how."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.requests: list[str] = []
        #: Blobs the ``served`` mode answers, by name (zstd streams).
        self.blobs: dict[str, bytes] = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self) -> None:
                fake.requests.append(f"{self.command} {self.path}")
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                status, body = fake.answer(self.command, self.path)
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = do_POST = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/main"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, method: str, path: str) -> tuple[int, bytes]:
        if self.mode == "500":
            return 500, b"boom"
        if self.mode == "proxy-413" and method != "GET":  # nginx's client_max_body_size
            return 413, b"<html><head><title>413 Request Entity Too Large</title></head></html>"
        if self.mode == "slow":
            time.sleep(3)  # an answer slower than the shim's timeout, on purpose
            return 404, b""
        if self.mode == "garbage":
            return 200, b"\x00not a manifest"
        if self.mode in ("bad-manifest", "slow-entries") and "/direct/" in path:
            entries = [{"sources": ["src/lib.rs"], "env": [f"V{i}"]} for i in range(32)]
            return 200, json.dumps({"entries": entries}).encode()
        if self.mode == "bad-manifest" and "/manifests/" in path:
            outputs = [{"name": "../libt-x.rlib", "blake3": "ab" * 32, "size": 1, "mode": 420}]
            document = {"version": 1, "crate": "t", "outputs": outputs, "stdout": "",
                        "stderr": "", "exit_code": 0}  # fmt: skip
            return 200, json.dumps(document).encode()
        if self.mode == "slow-entries" and "/manifests/" in path:
            time.sleep(0.4)  # each in time (LARDER_TIMEOUT 0.5), all together far too slow
            return 404, b""
        if self.mode == "slow-blobs":  # every answer in time, the restore far too slow
            time.sleep(0.4)
            if "/direct/" in path:
                return 200, b'{"entries":[{"sources":["src/lib.rs"],"env":[]}]}'
            if "/manifests/" in path:
                return 200, self.manifest
            return 200, zstandard.ZstdCompressor().compress(b"x")
        if self.mode == "served":  # whatever the test stored, for any key
            if "/direct/" in path:
                return 200, b'{"entries":[{"sources":["src/lib.rs"],"env":[]}]}'
            if "/manifests/" in path:
                return 200, self.manifest
            if "/blobs/" in path and path.rsplit("/", 1)[1] in self.blobs:
                return 200, self.blobs[path.rsplit("/", 1)[1]]
        if self.mode == "corrupt-blob":
            if "/direct/" in path:  # an entry naming the crate root: its key is looked up
                return 200, b'{"entries":[{"sources":["src/lib.rs"],"env":[]}]}'
            if "/manifests/" in path:
                return 200, self.manifest
            return 200, zstandard.ZstdCompressor().compress(b"not what the manifest promised")
        return 404, b""

    manifest = b""

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


LIB = ["--crate-name", "t", "--edition=2021", "src/lib.rs", "--crate-type", "lib",
       "--emit=dep-info,metadata,link"]  # fmt: skip
OUTPUTS = ("libt-x.rlib", "libt-x.rmeta", "t-x.d")


def shim(
    crate: Path,
    url: str,
    *extra: str,
    crate_args: list[str] = LIB,
    wait: bool = True,
    **env: str,
) -> subprocess.CompletedProcess[str]:
    """The shim compiling ``crate`` (with a token, then until its uploads are sent)."""
    rustc = env.pop("RUSTC_OVERRIDE", RUSTC)
    argv = [rustc, *crate_args, "-C", "extra-filename=-x", "--out-dir", str(crate / "out"), *extra]
    environ = {
        **os.environ,
        "LARDER_URL": url,
        "LARDER_STATE_DIR": str(crate / "state"),
        "LARDER_TIMEOUT": "0.5",
        **env,
    }
    done = subprocess.run(
        [sys.executable, "-m", "larder.client.shim", *argv],
        cwd=crate,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if environ.get("LARDER_TOKEN") and wait:
        wait_uploads(environ)
    return done


def wait_uploads(environ: dict[str, str], seconds: float = 30) -> None:
    """Until the detached uploader has sent (or counted as failed) every queued upload."""
    subprocess.run(
        [sys.executable, "-m", "larder.client.shim", "--wait-uploads", str(seconds)],
        env=environ,
        check=True,
        timeout=seconds + 30,
    )


def stats(crate: Path) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-m", "larder.client.shim", "--stats", "--json"],
        env={**os.environ, "LARDER_STATE_DIR": str(crate / "state")},
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(done.stdout))


@pytest.fixture
def fake(request: pytest.FixtureRequest) -> Iterator[FakeCache]:
    server = FakeCache(request.param)
    yield server
    server.close()


@pytest.mark.parametrize(
    ("fake", "kind"),
    [("500", "server"), ("slow", "timeout"), ("garbage", "corrupt"),
     ("corrupt-blob", "corrupt"), ("bad-manifest", "corrupt"), ("slow-entries", "timeout")],
    indirect=["fake"],
)  # fmt: skip
def test_bad_server_means_local_compile_and_a_counted_error(
    fake: FakeCache, kind: str, crate: Path
) -> None:
    if fake.mode == "corrupt-blob":
        outputs = tuple(
            Output(name, blake3.blake3(name.encode()).hexdigest(), 10, 0o644)
            for name in ("libt-x.rlib", "libt-x.rmeta", "t-x.d")
        )
        fake.manifest = Manifest("t", outputs).to_json()
    done = shim(crate, fake.url)
    assert done.returncode == 0, done.stderr
    assert (crate / "out" / "libt-x.rlib").stat().st_size > 0
    assert sorted(p.name for p in (crate / "out").iterdir()) == [
        "libt-x.rlib", "libt-x.rmeta", "t-x.d"
    ]  # fmt: skip
    counted = stats(crate)
    assert counted["errors"] == 1 and counted["hits"] == 0
    assert counted["error_kinds"] == {kind: 1}


@pytest.mark.parametrize("fake", ["slow-blobs"], indirect=True)
def test_a_restore_past_the_lookup_deadline_compiles_here_and_stays_online(
    fake: FakeCache, crate: Path
) -> None:
    """A server answering each request just within LARDER_TIMEOUT made one hit cost many
    times a compilation: no download starts past 3x the timeout. Slow is not unreachable:
    the next compilation still asks the cache."""
    outputs = tuple(
        Output(name, blake3.blake3(b"x").hexdigest(), 1, 0o644)
        for name in ("libt-x.rlib", "libt-x.rmeta", "t-x.d")
    )
    fake.manifest = Manifest("t", outputs).to_json()
    for _ in range(2):
        start = time.monotonic()
        done = shim(crate, fake.url)
        assert done.returncode == 0, done.stderr
        assert time.monotonic() - start < 10
        assert (crate / "out" / "libt-x.rlib").stat().st_size > 1  # compiled, not restored
    assert stats(crate)["error_kinds"] == {"slow": 2}
    assert len([r for r in fake.requests if "/blobs/" in r]) == 4  # two of three, twice


def serve_outputs(fake: FakeCache, crate: Path, replaced: dict[str, bytes]) -> None:
    """Have ``fake`` serve the outputs of ``crate`` compiled here, some ``replaced``."""
    with tempfile.TemporaryDirectory() as elsewhere:
        built = Path(elsewhere) / "crate"
        shutil.copytree(crate / "src", built / "src")
        (built / "out").mkdir()
        argv = [RUSTC, *LIB, "-C", "extra-filename=-x", "--out-dir", str(built / "out")]
        subprocess.run(argv, cwd=built, check=True)
        found = {name: (built / "out" / name).read_bytes() for name in OUTPUTS}
    outputs = []
    for name in OUTPUTS:
        data = replaced.get(name, found[name])
        blob = blake3.blake3(data).hexdigest()
        fake.blobs[blob] = zstandard.ZstdCompressor().compress(data)
        outputs.append(Output(name, blob, len(data), 0o644))
    fake.manifest = Manifest("t", tuple(outputs)).to_json()


@pytest.mark.parametrize("fake", ["served"], indirect=True)
def test_a_restored_dep_info_names_what_the_key_read(fake: FakeCache, crate: Path) -> None:
    """A dep-info naming no source made cargo take every later edit as nothing to compile,
    with or without the shim, until a clean. It is compiled here instead."""
    serve_outputs(fake, crate, {})
    done = shim(crate, fake.url)
    assert done.returncode == 0, done.stderr
    assert stats(crate)["hits"] == 1  # the outputs as served are a hit
    for text in ("@LARDER:TARGET@/t-x.d:\n", "t-x.d: src/lib.rs\n\n# env-dep:HOME\n"):
        for name in OUTPUTS:
            (crate / "out" / name).unlink()
        serve_outputs(fake, crate, {"t-x.d": text.encode()})
        done = shim(crate, fake.url)
        assert done.returncode == 0, done.stderr
        assert "src/lib.rs" in (crate / "out" / "t-x.d").read_text()
        assert "env-dep" not in (crate / "out" / "t-x.d").read_text()
    counted = stats(crate)
    assert (counted["hits"], counted["error_kinds"]) == (1, {"corrupt": 2}), counted


@pytest.mark.parametrize("fake", ["served"], indirect=True)
def test_outputs_past_the_free_space_are_not_downloaded(
    fake: FakeCache, crate: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blob is checked once written: a manifest declaring gigabytes filled the disk first."""
    serve_outputs(fake, crate, {})
    free = os.statvfs(crate / "out")
    huge = free.f_bavail * free.f_frsize
    manifest = json.loads(fake.manifest)
    manifest["outputs"][0]["size"] = huge
    fake.manifest = json.dumps(manifest).encode()
    done = shim(crate, fake.url)
    assert done.returncode == 0, done.stderr
    assert not [r for r in fake.requests if "/blobs/" in r], fake.requests
    assert stats(crate)["error_kinds"] == {"no-room": 1}
    manifest["outputs"][0]["size"] = 1
    manifest["outputs"][2]["size"] = 17 * 1024**2  # the dep-info
    fake.manifest = json.dumps(manifest).encode()
    done = shim(crate, fake.url)
    assert done.returncode == 0, done.stderr
    assert not [r for r in fake.requests if "/blobs/" in r], fake.requests
    assert stats(crate)["error_kinds"] == {"no-room": 1, "corrupt": 1}


def test_unreachable_server_backs_off(crate: Path) -> None:
    closed = FakeCache("404")
    url = closed.url
    closed.close()
    first = shim(crate, url)
    assert first.returncode == 0
    second = shim(crate, url)
    assert second.returncode == 0
    assert stats(crate)["error_kinds"] == {"connect": 1, "offline": 1}
    other = FakeCache("404")  # another cache, the same state directory: not backed off
    try:
        assert shim(crate, other.url).returncode == 0
        assert other.requests
    finally:
        other.close()
    assert stats(crate)["error_kinds"] == {"connect": 1, "offline": 1}


@pytest.mark.parametrize("fake", ["404"], indirect=True)
def test_non_compilations_never_touch_the_network(fake: FakeCache, crate: Path) -> None:
    environ = {**os.environ, "LARDER_URL": fake.url, "LARDER_STATE_DIR": str(crate / "state")}
    probes = (["-vV"], ["-", "--crate-name", "___", "--print=file-names"])
    for module, argv in itertools.product(("larder.client.entry", "larder.client.shim"), probes):
        done = subprocess.run(
            [sys.executable, "-m", module, RUSTC, *argv],
            env=environ,
            input="",
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
    assert fake.requests == []
    assert not (crate / "state" / "stats.json").exists()


@pytest.mark.parametrize("fake", ["404"], indirect=True)
def test_a_miss_without_a_token_only_reads(fake: FakeCache, crate: Path) -> None:
    done = shim(crate, fake.url, LARDER_LOG=str(crate / "log"))
    assert done.returncode == 0
    assert {r.split()[0] for r in fake.requests} == {"GET"}  # direct entries (none: a miss)
    counted = stats(crate)
    assert (counted["misses"], counted["errors"], counted["uploads"]) == (1, 0, 0)
    line = (crate / "log").read_text()
    assert "crate=t " in line and "result=miss" in line


@pytest.mark.parametrize("fake", ["proxy-413"], indirect=True)
def test_an_upload_refused_for_its_size_says_so(fake: FakeCache, crate: Path) -> None:
    """A proxy's 413 (nginx's 1 MiB default) is counted as too-large, with what it answered."""
    from larder.protocol import tokens
    from larder.protocol.tokens import Scope, TokenClaims

    claims = TokenClaims("0123456789abcdef", "main", Scope.WRITE, None, 1_800_000_000)
    token = tokens.issue(bytes(32), claims)
    assert shim(crate, fake.url, LARDER_TOKEN=token).returncode == 0
    counted = stats(crate)
    assert counted["error_kinds"] == {"too-large": 1} and counted["uploads"] == 0, counted
    assert "HTTP 413" in counted["last_errors"]["too-large"]
    assert "Request Entity Too Large" in counted["last_errors"]["too-large"]
    shown = subprocess.run(
        [sys.executable, "-m", "larder.client.shim", "--stats"],
        env={**os.environ, "LARDER_STATE_DIR": str(crate / "state")},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "last too-large: " in shown.stdout and "HTTP 413" in shown.stdout, shown.stdout


@pytest.mark.parametrize("fake", ["404"], indirect=True)
def test_a_cache_behind_a_path_prefix_gets_the_uploads(fake: FakeCache, crate: Path) -> None:
    """``https://host/larder/main`` (a reverse proxy's prefix) names cache ``main``: a write
    token for ``main`` uploads there, under the prefix."""
    from larder.protocol import tokens
    from larder.protocol.tokens import Scope, TokenClaims

    claims = TokenClaims("0123456789abcdef", "main", Scope.WRITE, None, 1_800_000_000)
    token = tokens.issue(bytes(32), claims)
    url = fake.url.replace("/main", "/larder/main")
    assert shim(crate, url, LARDER_TOKEN=token).returncode == 0
    writes = [r for r in fake.requests if r.split()[0] in ("PUT", "POST")]
    assert writes and all(r.split()[1].startswith("/larder/main/rustc/") for r in writes), writes
    assert all(r.split()[1].startswith("/larder/main/") for r in fake.requests)


@pytest.mark.parametrize("fake", ["404"], indirect=True)
def test_compile_errors_pass_through(fake: FakeCache, crate: Path) -> None:
    (crate / "src" / "lib.rs").write_text("pub fn broken( {}\n")
    done = shim(crate, fake.url)
    assert done.returncode != 0
    assert "error" in done.stderr
    assert stats(crate)["non_cacheable_reasons"] == {"no-key": 1}


def test_disabled_or_unconfigured_shim_just_runs_rustc(crate: Path) -> None:
    for env in ({"LARDER_DISABLE": "1"}, {"LARDER_URL": ""}):
        done = shim(crate, "http://127.0.0.1:9/main", **env)
        assert done.returncode == 0
        assert (crate / "out" / "libt-x.rlib").exists()
    assert not (crate / "state").exists()


def test_stats_survive_and_zero(crate: Path) -> None:
    from larder.client.stats import Stats

    store = Stats(crate / "state")
    workers = [
        threading.Thread(target=store.add, args=({"hits": 1, "bytes_down": 10},)) for _ in range(20)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    counted = stats(crate)
    assert counted["hits"] == 20 and counted["bytes_down"] == 200
    subprocess.run(
        [sys.executable, "-m", "larder.client.shim", "--zero-stats"],
        env={**os.environ, "LARDER_STATE_DIR": str(crate / "state")},
        check=True,
        capture_output=True,
    )
    assert stats(crate)["hits"] == 0


def two_checkouts(base: Path) -> list[Path]:
    """The same one-file crate checked out as ``ci`` and ``laptop`` under ``base``."""
    machines = []
    for name in ("ci", "laptop"):
        crate = base / name / "src" / "crate"
        (crate / "src").mkdir(parents=True)
        (crate / "src" / "lib.rs").write_text("pub fn answer() -> u32 { 42 }\n")
        (crate / "out").mkdir()
        machines.append(crate)
    return machines


def test_second_machine_hits_through_direct_mode_without_running_rustc(tmp_path: Path) -> None:
    from tests.e2e.harness import larder_server

    log = tmp_path / "rustc-calls"
    logging_rustc = tmp_path / "rustc"
    logging_rustc.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec {RUSTC} "$@"\n')
    logging_rustc.chmod(0o755)
    machines = two_checkouts(tmp_path)
    with larder_server(str(tmp_path / "data"), tmp_path) as server:
        url = f"{server.url}/main"
        ci = shim(machines[0], url, LARDER_TOKEN=server.token(), RUSTC_OVERRIDE=str(logging_rustc))
        assert ci.returncode == 0, ci.stderr
        log.unlink()
        laptop = shim(machines[1], url, RUSTC_OVERRIDE=str(logging_rustc))
        assert laptop.returncode == 0, laptop.stderr
    calls = log.read_text().splitlines() if log.exists() else []
    assert not [c for c in calls if "--crate-name" in c], calls  # no dep-info run, no compile
    assert stats(machines[1])["hits"] == 1
    assert (machines[1] / "out" / "libt-x.rlib").read_bytes() == (
        machines[0] / "out" / "libt-x.rlib"
    ).read_bytes()


def test_a_crate_printing_thousands_of_warnings_is_cached_and_replays_them(
    tmp_path: Path,
) -> None:
    """900 warnings are 1.5 MB of rustc's JSON, more than a manifest may hold: it was refused
    (413, after its blobs were sent) on every build. Its text is now kept compressed."""
    from tests.e2e.harness import larder_server

    machines = two_checkouts(tmp_path)
    body = "".join(f"    let unused_{i} = {i};\n" for i in range(900))
    for crate in machines:
        (crate / "src" / "lib.rs").write_text(f"pub fn answer() -> u32 {{\n{body}    42\n}}\n")
    json_output = ("--error-format=json", "--json=diagnostic-rendered-ansi")
    with larder_server(str(tmp_path / "data"), tmp_path) as server:
        url = f"{server.url}/main"
        ci = shim(machines[0], url, *json_output, LARDER_TOKEN=server.token())
        assert ci.returncode == 0 and ci.stderr.count("unused_") >= 900
        assert stats(machines[0])["uploads"] == 1, stats(machines[0])
        laptop = shim(machines[1], url, *json_output)
        assert laptop.returncode == 0
    assert stats(machines[1])["hits"] == 1
    assert laptop.stderr.replace("/laptop/", "/ci/") == ci.stderr  # every warning, its own paths


def test_a_hit_whose_blob_the_cache_lost_is_compiled_and_uploaded_again(tmp_path: Path) -> None:
    """A collector of a release that could not read a manifest took one of its blobs and kept
    the manifest: every build then failed to restore it, compiled, and uploaded nothing, so
    the crate was never cached again. A lost blob is now a miss that uploads."""
    import asyncio

    from larder.core import keys
    from larder.storage.disk import DiskStorage
    from tests.e2e.harness import larder_server

    ci, laptop = two_checkouts(tmp_path)
    third = tmp_path / "third" / "crate"
    shutil.copytree(ci, third, ignore=shutil.ignore_patterns("out", "state"))
    (third / "out").mkdir()

    async def drop_blob_markers() -> int:
        storage = DiskStorage(tmp_path / "data")
        try:
            markers = [k async for k in storage.keys(keys.rustc_blob("main", ""))]
            for key in markers:
                await storage.delete(key)
            return len(markers)
        finally:
            await storage.close()

    with larder_server(str(tmp_path / "data"), tmp_path) as server:
        url, token = f"{server.url}/main", server.token()
        assert shim(ci, url, LARDER_TOKEN=token).returncode == 0
        assert stats(ci)["uploads"] == 1
        assert asyncio.run(drop_blob_markers()) >= 1
        healed = shim(laptop, url, LARDER_TOKEN=token)
        assert healed.returncode == 0, healed.stderr
        counted = stats(laptop)
        assert (counted["hits"], counted["uploads"]) == (0, 1), counted
        assert shim(third, url).returncode == 0
    assert stats(third)["hits"] == 1
    assert (third / "out" / "libt-x.rlib").read_bytes() == (ci / "out" / "libt-x.rlib").read_bytes()


def test_a_read_token_reads_a_private_cache_and_never_tries_to_upload(tmp_path: Path) -> None:
    from tests.e2e.harness import larder_server

    machines = two_checkouts(tmp_path)
    ci, laptop = machines
    with larder_server(str(tmp_path / "data"), tmp_path) as server:
        server.run_cli("cache", "set", "main", "--private")
        url = f"{server.url}/main"
        assert shim(ci, url, LARDER_TOKEN=server.token()).returncode == 0
        read = server.token(scope="read")
        assert shim(laptop, url, LARDER_TOKEN=read).returncode == 0  # a hit
        (laptop / "src" / "lib.rs").write_text("pub fn answer() -> u32 { 43 }\n")
        missed = shim(laptop, url, LARDER_TOKEN=read, LARDER_LOG=str(laptop / "log"))
        assert missed.returncode == 0, missed.stderr
    counted = stats(laptop)
    assert (counted["hits"], counted["misses"], counted["errors"], counted["uploads"]) == (
        1, 1, 0, 0,
    ), counted  # fmt: skip
    assert "error=" not in (laptop / "log").read_text()
    assert not list((laptop / "state").rglob("*.job*")), "an upload was queued"
    assert (laptop / "out" / "libt-x.rlib").exists()


BIN = ["--crate-name", "hello", "--edition=2021", "src/main.rs", "--crate-type", "bin",
       "--emit=dep-info,link", "-L", "native=native", "-l", "static=answer"]  # fmt: skip


def stored_document(data: Path, kind: str) -> tuple[Path, dict[str, Any]]:
    """The one rustc document of ``kind`` (``direct``, ``manifest``) cache main holds in the
    disk store ``data``: its file and its JSON."""
    found = [p for p in (data / "objects").glob(f"caches/main/rustc/{kind}/**/*") if p.is_file()]
    assert len(found) == 1, found
    return found[0], json.loads(found[0].read_bytes())


def bin_crate(base: Path, answer: int = 42) -> Path:
    """A binary that calls into a C static library on its -L path."""
    crate = base / "src" / "hello"
    (crate / "src").mkdir(parents=True)
    (crate / "src" / "main.rs").write_text(
        'extern "C" { fn answer() -> i32; }\n'
        'fn main() { println!("answer {}", unsafe { answer() }); }\n'
    )
    (crate / "out").mkdir()
    native_lib(crate, answer)
    return crate


def native_lib(crate: Path, answer: int) -> None:
    native = crate / "native"
    native.mkdir(exist_ok=True)
    (native / "answer.c").write_text(f"int answer(void) {{ return {answer}; }}\n")
    subprocess.run(["cc", "-c", "-fPIC", "answer.c", "-o", "answer.o"], cwd=native, check=True)
    (native / "libanswer.a").unlink(missing_ok=True)
    subprocess.run(["ar", "crsD", "libanswer.a", "answer.o"], cwd=native, check=True)


def test_binaries_are_cached_with_their_link_inputs(tmp_path: Path) -> None:
    from tests.e2e.harness import larder_server

    log = tmp_path / "rustc-calls"
    logging_rustc = tmp_path / "rustc"
    logging_rustc.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec {RUSTC} "$@"\n')
    logging_rustc.chmod(0o755)
    ci, laptop = bin_crate(tmp_path / "ci"), bin_crate(tmp_path / "home" / "me")
    with larder_server(str(tmp_path / "data"), tmp_path) as server:
        url = f"{server.url}/main"
        # Both through the same logging script (a wrapper is part of the key).
        done = shim(
            ci, url, crate_args=BIN, LARDER_TOKEN=server.token(), RUSTC_OVERRIDE=str(logging_rustc)
        )
        assert done.returncode == 0, done.stderr
        assert stats(ci)["uploads"] == 1

        log.unlink(missing_ok=True)
        done = shim(laptop, url, crate_args=BIN, RUSTC_OVERRIDE=str(logging_rustc))
        assert done.returncode == 0, done.stderr
        calls = log.read_text().splitlines() if log.exists() else []
        assert not [c for c in calls if "--crate-name" in c], calls  # a hit: no compile
        binary = laptop / "out" / "hello-x"
        assert os.access(binary, os.X_OK)
        assert binary.read_bytes() == (ci / "out" / "hello-x").read_bytes()
        assert subprocess.run([binary], capture_output=True, text=True).stdout == "answer 42\n"

        # Another link argument, or another native library: the link differs, so a miss.
        done = shim(laptop, url, "-C", "link-arg=-Wl,--build-id=sha1", crate_args=BIN)
        assert done.returncode == 0, done.stderr
        native_lib(laptop, 43)
        done = shim(laptop, url, crate_args=BIN)
        assert done.returncode == 0, done.stderr
        assert subprocess.run([binary], capture_output=True, text=True).stdout == "answer 43\n"
        counted = stats(laptop)
        assert (counted["hits"], counted["misses"], counted["errors"]) == (1, 2, 0)

        # What the key cannot describe is compiled locally and counted with its reason.
        done = shim(laptop, url, "-C", "link-arg=-Wl,-Map=hello.map", crate_args=BIN)
        assert done.returncode == 0, done.stderr
        assert stats(laptop)["non_cacheable_reasons"] == {"link-arg": 1}


def test_a_recorded_link_line_cannot_choose_the_program_run(tmp_path: Path) -> None:
    """A direct entry whose link line names another program than the compilation's linker is
    unusable: the key would ask that program for its version and search directories."""
    from tests.e2e.harness import larder_server

    ci, laptop = bin_crate(tmp_path / "ci"), bin_crate(tmp_path / "home" / "me")
    ran = tmp_path / "ran"
    for crate in (ci, laptop):
        script = crate / "linker.sh"
        script.write_text(f'#!/bin/sh\necho "$*" >> {ran}\nexec cc "$@"\n')
        script.chmod(0o755)
    with larder_server(str(tmp_path / "data"), tmp_path) as server:
        url = f"{server.url}/main"
        done = shim(ci, url, crate_args=BIN, LARDER_TOKEN=server.token())
        assert done.returncode == 0, done.stderr
        # The stored entry now names a script of the checkout as its linker driver.
        stored, entry = stored_document(tmp_path / "data", "direct")
        assert entry["link"][0] == "cc"
        entry["link"][0] = "@LARDER:CWD@/linker.sh"
        stored.write_bytes(json.dumps(entry).encode())

        done = shim(laptop, url, crate_args=BIN)
        assert done.returncode == 0, done.stderr
        assert not ran.exists(), ran.read_text()
        counted = stats(laptop)
        assert (counted["hits"], counted["misses"]) == (0, 1)
        assert subprocess.run([laptop / "out" / "hello-x"], capture_output=True).returncode == 0

        # The same script chosen by the compilation itself (-C linker=) is run and keyed.
        done = shim(ci, url, "-C", f"linker={ci / 'linker.sh'}", crate_args=BIN,
                    LARDER_TOKEN=server.token())  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert ran.exists()


def test_a_recorded_link_line_names_no_file_outside_the_project(tmp_path: Path) -> None:
    """A direct entry whose link line names a file, a search directory or a library outside
    the checkout, its target, CARGO_HOME's directories and the sysroot, where the compilation
    itself names none, is unusable: the key hashed it, and the lookups that followed told the
    cache whether it existed (~/.ssh/id_ed25519)."""
    from tests.e2e.harness import larder_server

    ci, laptop = bin_crate(tmp_path / "ci"), bin_crate(tmp_path / "home" / "me")
    sysroot = subprocess.run(
        [RUSTC, "--print", "sysroot"], capture_output=True, text=True, check=True
    ).stdout.strip()
    secret = tmp_path / "home" / "elsewhere" / "libsecret.a"
    secret.parent.mkdir(parents=True)
    secret.write_bytes(b"!<arch>\n")
    with larder_server(str(tmp_path / "data"), tmp_path) as server:
        url = f"{server.url}/main"
        done = shim(ci, url, crate_args=BIN, LARDER_TOKEN=server.token())
        assert done.returncode == 0, done.stderr
        stored, entry = stored_document(tmp_path / "data", "direct")
        line = entry["link"]
        outside = "@LARDER:CWD@/../../../elsewhere"
        for tried, extra in enumerate(
            (
                [str(secret)],
                [f"{outside}/libsecret.a"],
                [f"-L{secret.parent}", "-lsecret"],
                ["-l:../../../../elsewhere/libsecret.a"],
                [f"-Wl,-L,{secret.parent}", "-l:libsecret.a"],
                [f"-B@LARDER:SYSROOT@/{os.path.relpath(secret.parent, sysroot)}", "-lsecret"],
            )
        ):
            stored.write_bytes(json.dumps({**entry, "link": [*line, *extra]}).encode())
            keys = laptop / f"keys-{tried}"
            done = shim(laptop, url, crate_args=BIN, LARDER_KEY_DIR=str(keys))
            assert done.returncode == 0, done.stderr
            documents = b"".join(path.read_bytes() for path in keys.glob("*.json"))
            assert b"secret" not in documents, extra
        assert stats(laptop)["hits"] == 0
        # A directory the compilation itself names is read (and the entry is a hit).
        own = ["-L", f"native={secret.parent}"]
        done = shim(ci, url, *own, crate_args=BIN, LARDER_TOKEN=server.token())
        assert done.returncode == 0, done.stderr
        keys = laptop / "keys-own"
        before = stats(laptop)["hits"]
        done = shim(laptop, url, *own, crate_args=BIN, LARDER_KEY_DIR=str(keys))
        assert done.returncode == 0, done.stderr
        assert stats(laptop)["hits"] == before + 1
        assert b"elsewhere" in b"".join(path.read_bytes() for path in keys.glob("*.json"))


def test_a_binary_restored_from_a_manifest_recording_it_unexecutable_runs(
    tmp_path: Path,
) -> None:
    from tests.e2e.harness import larder_server

    ci, laptop = bin_crate(tmp_path / "ci"), bin_crate(tmp_path / "home" / "me")
    with larder_server(str(tmp_path / "data"), tmp_path) as server:
        url = f"{server.url}/main"
        done = shim(ci, url, crate_args=BIN, LARDER_TOKEN=server.token())
        assert done.returncode == 0, done.stderr
        stored, manifest = stored_document(tmp_path / "data", "manifest")
        for output in manifest["outputs"]:
            output["mode"] = 0o644
        stored.write_bytes(json.dumps(manifest).encode())
        done = shim(laptop, url, crate_args=BIN)
        assert done.returncode == 0, done.stderr
    assert stats(laptop)["hits"] == 1
    assert subprocess.run([laptop / "out" / "hello-x"], capture_output=True).returncode == 0


FAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


def test_a_file_is_judged_by_the_clock_of_its_own_file_system(tmp_path: Path) -> None:
    """The output directory's file system's clock dates the files on it; files elsewhere are
    judged by the shim's own (a target directory on a network volume whose clock runs behind
    made every local source look saved during the compilation: nothing was uploaded)."""
    from larder.client.shim import changed_since, stamped_now_ns

    source = tmp_path / "lib.rs"
    source.write_text("pub fn f() {}\n")
    changed = source.stat()
    stamped = stamped_now_ns(tmp_path)
    assert stamped is not None and stamped[0] == changed.st_dev
    assert not list(tmp_path.glob(".larder-clock-*"))
    behind = {changed.st_dev: changed.st_ctime_ns + 1}  # that clock says: written before
    assert not changed_since(["lib.rs"], tmp_path, changed.st_ctime_ns, behind)
    assert changed_since(["lib.rs"], tmp_path, changed.st_ctime_ns)  # by the shim's clock
    other_device = {changed.st_dev + 1: changed.st_ctime_ns + 1}
    assert changed_since(["lib.rs"], tmp_path, changed.st_ctime_ns, other_device)


@pytest.mark.parametrize("offset", ["", "+1h"])
def test_a_source_saved_while_rustc_runs_is_not_uploaded(crate: Path, offset: str) -> None:
    """rustc read the old text; a key hashed afterwards names the new one: such outputs would
    be a wrong hit for every checkout of the new text. Also with the shim's clock an hour ahead
    of the one stamping the files (a network file system's server, a clock stepped back while
    rustc ran), when the save looked older than the compilation."""
    from tests.e2e.harness import larder_server

    assert FAKETIME.exists(), "libfaketime is not installed (make system-deps)"
    skewed = {"LD_PRELOAD": str(FAKETIME), "FAKETIME": offset, "LARDER_RESIDENT": "0"}
    saving = crate / "rustc-then-save"
    saving.write_text(
        f'#!/bin/sh\nenv -u LD_PRELOAD -u FAKETIME {RUSTC} "$@"; code=$?\n'
        'case "$*" in *--crate-name*) echo "// saved" >> src/lib.rs;; esac\nexit $code\n'
    )
    saving.chmod(0o755)
    with larder_server(str(crate / "data"), crate) as server:
        done = shim(crate, f"{server.url}/main", LARDER_TOKEN=server.token(),
                    RUSTC_OVERRIDE=str(saving), **(skewed if offset else {}))  # fmt: skip
        assert done.returncode == 0, done.stderr
        counted = stats(crate)
        assert counted["uploads"] == 0, counted
        assert counted["error_kinds"] == {"changed-while-compiling": 1}


def test_a_source_dated_in_the_future_is_uploaded(crate: Path) -> None:
    """A modification time ahead of the clock (a tarball from a skewed machine, ``touch -d``)
    says nothing about a save during the compilation: the change time does."""
    from tests.e2e.harness import larder_server

    ahead = time.time() + 3600
    os.utime(crate / "src" / "lib.rs", (ahead, ahead))
    with larder_server(str(crate / "data"), crate) as server:
        done = shim(crate, f"{server.url}/main", LARDER_TOKEN=server.token())
        assert done.returncode == 0, done.stderr
        counted = stats(crate)
        assert counted["uploads"] == 1, counted


@pytest.mark.parametrize("fake", ["404"], indirect=True)
def test_a_workspace_wrapper_gets_the_compiler_first(fake: FakeCache, crate: Path) -> None:
    """``cargo clippy`` runs ``larder-rustc clippy-driver RUSTC ARGS``: the driver takes
    ``RUSTC`` as its first argument (the shim's remaps after it, not before)."""
    driver = crate / "clippy-driver"
    driver.write_text(
        '#!/bin/sh\ncase "$1" in */rustc|rustc) ;; *) echo "first: $1" >&2; exit 3;; esac\n'
        'exec "$@"\n'
    )
    driver.chmod(0o755)
    done = shim(crate, fake.url, crate_args=[RUSTC, *LIB], RUSTC_OVERRIDE=str(driver))
    assert done.returncode == 0, done.stderr
    assert (crate / "out" / "libt-x.rlib").is_file()


def test_entry_point_decides_without_the_shim() -> None:
    from larder.client.probe import cache_enabled, is_probe

    assert is_probe(["-vV"]) and is_probe(["-", "--print=cfg"]) and is_probe(["--print", "x"])
    assert not is_probe(["--crate-name", "x", "src/lib.rs", "--printer"])
    assert cache_enabled({"LARDER_URL": "http://h/main"})
    assert not cache_enabled({"LARDER_URL": "http://h/main", "LARDER_DISABLE": "yes"})
    assert not cache_enabled({})


def key_documents(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_bytes()) for p in sorted(directory.glob("*.json"))]


@pytest.mark.parametrize("fake", ["miss"], indirect=True)
def test_target_cpu_native_is_keyed_by_the_features_it_enables(
    fake: FakeCache, crate: Path
) -> None:
    """Code built for this CPU may not run on another: the key holds what ``native`` means."""
    plain, native = crate / "keys-plain", crate / "keys-native"
    assert shim(crate, fake.url, LARDER_KEY_DIR=str(plain)).returncode == 0
    done = shim(crate, fake.url, "-C", "target-cpu=native", LARDER_KEY_DIR=str(native))
    assert done.returncode == 0, done.stderr
    assert all("target-cpu-native" not in d["rustc"] for d in key_documents(plain))
    [line] = {
        line for d in key_documents(native) for line in d["rustc"].splitlines() if "native" in line
    }
    assert 'target_feature="sse2"' in line  # x86_64's baseline, enabled on any such CPU


@pytest.mark.parametrize("fake", ["miss"], indirect=True)
def test_a_rustc_wrapper_script_is_keyed_by_its_text(fake: FakeCache, crate: Path) -> None:
    """``RUSTC`` set to a script in front of the compiler (one that may add flags)."""
    wrapper = crate / "bin" / "rustc"
    wrapper.parent.mkdir()
    keys = []
    for extra in ("", " --cfg foo"):
        wrapper.write_text(f'#!/bin/sh\nexec {RUSTC} "$@"{extra}\n')
        wrapper.chmod(0o755)
        directory = crate / f"keys{len(keys)}"
        done = shim(crate, fake.url, RUSTC_OVERRIDE=str(wrapper), LARDER_KEY_DIR=str(directory))
        assert done.returncode == 0, done.stderr
        keys.append({d["rustc"] for d in key_documents(directory)})
    assert all("rustc-wrapper-blake3: " in rustc for found in keys for rustc in found)
    assert keys[0].isdisjoint(keys[1])
    direct = crate / "keys-direct"
    assert shim(crate, fake.url, LARDER_KEY_DIR=str(direct)).returncode == 0
    assert all("rustc-wrapper" not in d["rustc"] for d in key_documents(direct))


@pytest.mark.parametrize("fake", ["miss"], indirect=True)
def test_a_remap_of_the_users_own_wins_over_the_shims(fake: FakeCache, crate: Path) -> None:
    done = shim(crate, fake.url, "-g", f"--remap-path-prefix={crate}=/my/project")
    assert done.returncode == 0, done.stderr
    assert b"/my/project" in (crate / "out" / "libt-x.rlib").read_bytes()


def test_a_module_made_ambiguous_fails_as_without_the_cache(tmp_path: Path) -> None:
    """CI compiled ``mod amb;`` from ``amb.rs``; a checkout that also has ``amb/mod.rs`` gets
    rustc's error (E0761), not CI's compilation through the direct entry."""
    from tests.e2e.harness import larder_server

    crates = []
    for name in ("ci", "laptop"):
        crate = tmp_path / name
        (crate / "src").mkdir(parents=True)
        (crate / "out").mkdir()
        (crate / "src" / "lib.rs").write_text("mod amb;\npub fn f() -> u8 { amb::g() }\n")
        (crate / "src" / "amb.rs").write_text("pub fn g() -> u8 { 1 }\n")
        crates.append(crate)
    ci, laptop = crates
    (laptop / "src" / "amb").mkdir()
    (laptop / "src" / "amb" / "mod.rs").write_text("pub fn g() -> u8 { 2 }\n")
    with larder_server(str(tmp_path / "data"), tmp_path) as server:
        url = f"{server.url}/main"
        assert shim(ci, url, LARDER_TOKEN=server.token()).returncode == 0
        assert stats(ci)["uploads"] == 1
        done = shim(laptop, url)
    assert done.returncode != 0 and "E0761" in done.stderr, done.stderr
    assert stats(laptop)["hits"] == 0


@pytest.mark.parametrize(
    ("args", "executables"),
    [
        (["--crate-type", "bin", "--emit=dep-info,link"], {"x-1"}),
        (["--crate-type", "lib", "--emit=dep-info,metadata,link"], set()),
        (["--crate-type", "proc-macro", "--emit=dep-info,link"], {"libx-1.so"}),
        (["--crate-type", "cdylib", "--emit=link"], {"libx-1.so"}),
        (["--crate-type", "staticlib", "--emit=link"], set()),
    ],
)
def test_a_restored_output_gets_the_mode_rustc_would_give_it(
    args: list[str], executables: set[str]
) -> None:
    """Whether an output is executable follows from its name, not from the mode the cache
    recorded: a manifest saying 0o644 for a binary left it unable to run, and cargo took it as
    fresh until a clean."""
    from larder.client.args import parse
    from larder.client.shim import file_mode

    compilation = parse(["--crate-name", "x", "src/lib.rs", "-C", "extra-filename=-1", *args])
    assert compilation is not None
    assert compilation.executables() == executables
    assert executables <= set(compilation.expected_outputs())
    umask = os.umask(0o027)
    try:
        assert file_mode(True) == 0o750 and file_mode(False) == 0o640
    finally:
        os.umask(umask)
