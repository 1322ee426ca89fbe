"""Uploads leave the build's critical path, yet every one is counted and none is half-visible."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import blake3
import pytest

from larder.client import uploads
from tests.client.test_shim import shim, stats, wait_uploads
from tests.wait import wait_until


def stored_answer(path: str) -> bytes:
    """What larder answers an upload to ``path``: the blob id or key it stored."""
    name = path.split("?")[0].rsplit("/", 1)[1]
    return json.dumps({"blake3" if "/blobs/" in path else "key": name}).encode()


class UploadSink:
    """A cache that misses every lookup and treats uploads as ``mode`` says: ``accept`` them,
    answer ``500``, ``hang`` on blob uploads until :meth:`close`, take blobs only without a
    Content-Encoding (``no-codings``: 415 otherwise, as a server from before codings;
    ``codings-fail``: 400, as one whose aiohttp failed to decode them), refuse every blob
    (``refuses-blobs``: 400), or accept
    them but take :attr:`delay` seconds over what a miss asks after its compilation (``slow-
    explain``: the nearest inputs). Blob uploads are kept in ``blobs`` (name, coding, body)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.requests: list[str] = []
        self.blobs: list[tuple[str, str | None, bytes]] = []
        self.counts_misses = False  # answer a direct lookup's 404 "X-Larder-Counted: miss"
        self.delay = 4.0
        self.released = threading.Event()
        self.connections = 0
        self.sent = 0  # body bytes of every PUT
        self.credentials: list[str | None] = []  # the Authorization of each PUT and POST
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # connections are kept alive

            def setup(self) -> None:
                super().setup()
                sink.connections += 1

            def log_message(self, *args: object) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                sink.requests.append(f"{self.command} {self.path.split('?')[0]}")
                sink.sent += len(body) if self.command == "PUT" else 0
                if self.command in ("PUT", "POST"):
                    sink.credentials.append(self.headers.get("Authorization"))
                coding = self.headers.get("Content-Encoding")
                if self.command == "PUT" and "/blobs/" in self.path:
                    sink.blobs.append((self.path.rsplit("/", 1)[1], coding, body))
                status, answer = sink.answer(self.command, self.path, body, coding)
                try:
                    self.send_response(status)
                    if sink.counts_misses and "/direct/" in self.path and status == 404:
                        self.send_header("X-Larder-Counted", "miss")
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                except OSError:
                    pass  # the client was killed or gave up

            do_GET = do_PUT = do_POST = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/main"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(
        self, method: str, path: str, body: bytes, coding: str | None = None
    ) -> tuple[int, bytes]:
        if self.mode == "slow-explain" and method == "GET" and "/inputs" in path:
            time.sleep(self.delay)
        if method == "GET" or path.endswith("/explained"):
            return 404, b""
        if self.mode == "500":
            return 500, b"boom"
        if self.mode == "no-codings" and coding:
            return 415, b"this resource takes no Content-Encoding"
        if self.mode == "codings-fail" and coding:  # aiohttp before larder decoded codings
            return 400, b"400: Can not decode content-encoding: zstandard"
        if self.mode == "codings-fail-silently" and coding:
            return 400, b""
        if self.mode == "refuses-blobs" and "/blobs/" in path:
            return 400, b'{"code": 400, "error": "verification_failed", "message": "blake3"}'
        if path.endswith("/missing"):
            return 200, json.dumps({"missing": json.loads(body)["blobs"]}).encode()
        if self.mode == "hang" and "/blobs/" in path:
            self.released.wait(60)
        return 201, stored_answer(path)

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sink(request: pytest.FixtureRequest) -> Iterator[UploadSink]:
    server = UploadSink(request.param)
    yield server
    server.close()


def environ(crate: Path, url: str) -> dict[str, str]:
    return {**os.environ, "LARDER_URL": url, "LARDER_STATE_DIR": str(crate / "state"),
            "LARDER_TOKEN": "t", "LARDER_TIMEOUT": "0.5"}  # fmt: skip


@pytest.mark.parametrize("sink", ["500"], indirect=True)
def test_a_failed_background_upload_is_counted(sink: UploadSink, crate: Path) -> None:
    done = shim(crate, sink.url, LARDER_TOKEN="t")  # waits for the uploader
    assert done.returncode == 0, done.stderr
    counted = stats(crate)
    assert (counted["misses"], counted["uploads"], counted["errors"]) == (1, 0, 1)
    assert counted["error_kinds"] == {"server": 1}
    assert uploads.pending(uploads.spool_dir(crate / "state", sink.url)) == []


@pytest.mark.parametrize("sink", ["accept"], indirect=True)
def test_uploads_are_sent_in_order_after_the_compilation_returned(
    sink: UploadSink, crate: Path
) -> None:
    done = shim(crate, sink.url, wait=False, LARDER_TOKEN="t")
    assert done.returncode == 0, done.stderr
    wait_uploads(environ(crate, sink.url))
    puts = [r.split("/")[3] for r in sink.requests if r.startswith(("PUT", "POST /main/rustc/m"))]
    assert puts == ["missing", "blobs", "blobs", "blobs", "manifests", "direct"], sink.requests
    counted = stats(crate)
    assert (counted["uploads"], counted["errors"]) == (1, 0)
    assert counted["bytes_up"] > 0


@pytest.mark.parametrize("sink", ["accept"], indirect=True)
def test_each_job_is_sent_with_the_token_of_the_build_that_queued_it(
    sink: UploadSink, crate: Path
) -> None:
    """Two builds share a state directory; the second's job reaches the uploader the first
    started (it lingers), and still goes with the second build's token."""
    for token in ("first", "second"):
        done = shim(crate, sink.url, wait=False, LARDER_TOKEN=token)
        assert done.returncode == 0, done.stderr
    wait_uploads(environ(crate, sink.url))
    assert stats(crate)["uploads"] == 2
    half = len(sink.credentials) // 2
    assert sink.credentials == ["Bearer first"] * half + ["Bearer second"] * half


def test_a_queued_job_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    spool = uploads.spool_dir(tmp_path / "state", "http://127.0.0.1:9/main")
    job = uploads.enqueue(spool, {"url": "http://127.0.0.1:9/main", "token": "secret"}, {}, {})
    assert (job / uploads.JOB_FILE).stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("sink", ["hang"], indirect=True)
def test_a_killed_uploader_leaves_no_manifest_without_its_blobs(
    sink: UploadSink, crate: Path
) -> None:
    done = shim(crate, sink.url, wait=False, LARDER_TOKEN="t", LARDER_TIMEOUT="30")
    assert done.returncode == 0, done.stderr
    spool = uploads.spool_dir(crate / "state", sink.url)
    wait_until(lambda: any("/blobs/" in r for r in sink.requests), timeout=30)
    pid = int((spool / uploads.LOCK_FILE).read_text())
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not uploads.uploader_running(spool), timeout=10)
    assert not [r for r in sink.requests if r.startswith("PUT") and "/blobs/" not in r]
    assert len(uploads.pending(spool)) == 1  # kept, to be sent again

    sink.mode, sent = "accept", len(sink.requests)
    wait_uploads(environ(crate, sink.url))
    again = [r.split("/")[3] for r in sink.requests[sent:]]
    assert again == ["missing", "blobs", "blobs", "blobs", "manifests", "direct"], again
    assert stats(crate)["uploads"] == 1 and uploads.pending(spool) == []


@pytest.mark.parametrize("sink", ["hang"], indirect=True)
def test_the_snapshot_is_what_rustc_wrote(sink: UploadSink, crate: Path) -> None:
    done = shim(crate, sink.url, wait=False, LARDER_TOKEN="t", LARDER_TIMEOUT="30")
    assert done.returncode == 0, done.stderr
    [job] = uploads.pending(uploads.spool_dir(crate / "state", sink.url))  # held by the hang
    rlib = crate / "out" / "libt-x.rlib"
    original = rlib.read_bytes()
    rlib.unlink()  # as cargo replaces a file: the job keeps the bytes rustc wrote
    rlib.write_bytes(b"later")
    assert original in [p.read_bytes() for p in job.iterdir()]


def test_a_build_never_waits_past_the_timeout_on_a_hanging_server(crate: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # accepts (the kernel does) and never answers
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/main"
    try:
        start = time.monotonic()
        done = shim(crate, url, wait=False, LARDER_TOKEN="t", LARDER_TIMEOUT="0.5")
        elapsed = time.monotonic() - start
    finally:
        listener.close()
    assert done.returncode == 0, done.stderr
    assert (crate / "out" / "libt-x.rlib").exists()
    assert elapsed < 20  # one timed-out lookup, then a local compilation; never the 60 s cap
    counted = stats(crate)
    assert counted["error_kinds"] == {"timeout": 1} and counted["uploads"] == 0


@pytest.mark.parametrize("sink", ["hang"], indirect=True)
def test_a_hanging_upload_is_not_waited_for_and_times_out(sink: UploadSink, crate: Path) -> None:
    start = time.monotonic()
    done = shim(crate, sink.url, wait=False, LARDER_TOKEN="t", LARDER_TIMEOUT="1")
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - start < 20  # the compilation returned; the upload hangs
    wait_uploads(environ(crate, sink.url) | {"LARDER_TIMEOUT": "1"})
    counted = stats(crate)
    assert counted["error_kinds"] == {"timeout": 1} and counted["uploads"] == 0


def test_wait_uploads_gives_up_after_its_deadline(tmp_path: Path) -> None:
    url = "http://127.0.0.1:9/main"
    spool = uploads.spool_dir(tmp_path / "state", url)
    uploads.enqueue(spool, {"url": url}, {}, {})
    fd = os.open(spool / uploads.LOCK_FILE, os.O_RDWR | os.O_CREAT)
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_EX)  # an uploader that never finishes
    try:
        done = subprocess.run(
            [sys.executable, "-m", "larder.client.shim", "--wait-uploads", "0.3"],
            env={**os.environ, "LARDER_URL": url, "LARDER_STATE_DIR": str(tmp_path / "state")},
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        os.close(fd)
    assert done.returncode == 1 and "1 upload(s) still waiting" in done.stderr


def decoded(body: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj().decompress(body)


@pytest.mark.parametrize("sink", ["accept"], indirect=True)
def test_blobs_are_sent_as_zstd_streams_of_their_bytes(sink: UploadSink, crate: Path) -> None:
    done = shim(crate, sink.url, LARDER_TOKEN="t")
    assert done.returncode == 0, done.stderr
    assert len(sink.blobs) == 3
    for name, coding, body in sink.blobs:
        assert coding == "zstd"
        assert blake3.blake3(decoded(body)).hexdigest() == name
    rlib = (crate / "out" / "libt-x.rlib").read_bytes()
    assert rlib in [decoded(body) for _, _, body in sink.blobs]
    # What went over the wire is what is counted.
    sent = stats(crate)["bytes_up"]
    assert isinstance(sent, int) and sent >= sum(len(body) for _, _, body in sink.blobs)


@pytest.mark.parametrize("sink", ["accept"], indirect=True)
def test_upload_compression_can_be_turned_off(sink: UploadSink, crate: Path) -> None:
    done = shim(crate, sink.url, LARDER_TOKEN="t", LARDER_UPLOAD_ZSTD_LEVEL="off")
    assert done.returncode == 0, done.stderr
    assert [coding for _, coding, _ in sink.blobs] == [None, None, None]
    assert (crate / "out" / "libt-x.rlib").read_bytes() in [body for _, _, body in sink.blobs]


@pytest.mark.parametrize(
    "sink", ["no-codings", "codings-fail", "codings-fail-silently"], indirect=True
)
def test_a_server_that_takes_no_coding_gets_the_bytes_as_they_are(
    sink: UploadSink, crate: Path
) -> None:
    done = shim(crate, sink.url, LARDER_TOKEN="t")
    assert done.returncode == 0, done.stderr
    codings = [coding for _, coding, _ in sink.blobs]
    assert codings == ["zstd", None, None, None], codings  # asked once, then plain
    assert sink.blobs[0][0] == sink.blobs[1][0]
    counted = stats(crate)
    assert (counted["uploads"], counted["errors"]) == (1, 0)


@pytest.mark.parametrize("sink", ["refuses-blobs"], indirect=True)
def test_a_refused_blob_is_counted_and_not_sent_again(sink: UploadSink, crate: Path) -> None:
    done = shim(crate, sink.url, LARDER_TOKEN="t")
    assert done.returncode == 0, done.stderr
    assert [coding for _, coding, _ in sink.blobs] == ["zstd"]  # refused: not sent again
    counted = stats(crate)
    assert (counted["uploads"], counted["errors"]) == (0, 1)


@pytest.mark.parametrize("sink", ["hang"], indirect=True)
def test_the_uploader_runs_at_a_lower_priority(sink: UploadSink, crate: Path) -> None:
    done = shim(crate, sink.url, wait=False, LARDER_TOKEN="t", LARDER_TIMEOUT="30")
    assert done.returncode == 0, done.stderr
    spool = uploads.spool_dir(crate / "state", sink.url)
    wait_until(lambda: any("/blobs/" in r for r in sink.requests), timeout=30)
    pid = int((spool / uploads.LOCK_FILE).read_text())
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    assert int(fields[16]) - os.nice(0) == uploads.DEFAULT_NICE  # field 19: nice


@pytest.mark.parametrize(
    ("value", "nice", "level"),
    [
        (None, uploads.DEFAULT_NICE, uploads.DEFAULT_LEVEL),
        ("0", 0, 0),
        ("5", 5, 5),
        ("-3", uploads.DEFAULT_NICE, -3),
        ("19", 19, 19),
        ("25", uploads.DEFAULT_NICE, uploads.DEFAULT_LEVEL),
        ("fast", uploads.DEFAULT_NICE, uploads.DEFAULT_LEVEL),
        ("OFF", uploads.DEFAULT_NICE, None),
    ],
)
def test_upload_settings(value: str | None, nice: int, level: int | None) -> None:
    environ = (
        {} if value is None else {"LARDER_UPLOAD_NICE": value, "LARDER_UPLOAD_ZSTD_LEVEL": value}
    )
    assert uploads.upload_nice(environ) == nice
    assert uploads.upload_level(environ) == level


@pytest.mark.parametrize("sink", ["accept"], indirect=True)
def test_a_blob_whose_stream_finds_no_room_goes_as_it_is(
    sink: UploadSink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from larder.client import remote as remote_module

    def full_disk(path: object, mode: str = "r", *args: object) -> object:
        if str(path).endswith(".zst") and "w" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return open(path, mode, *args)  # type: ignore[call-overload]

    monkeypatch.setattr(remote_module, "open", full_disk, raising=False)
    monkeypatch.setattr(remote_module, "IN_MEMORY_STREAM", 100)  # streamed through a file
    blob = tmp_path / "blob"
    blob.write_bytes(b"rlib bytes " * 1000)
    remote = remote_module.Remote(sink.url, "t", 5.0, {})
    try:
        remote.put_blob(blake3.blake3(blob.read_bytes()).hexdigest(), blob, 1)
    finally:
        remote.close()
    assert [(coding, body) for _, coding, body in sink.blobs] == [(None, blob.read_bytes())]
    assert list(tmp_path.iterdir()) == [blob]


@pytest.mark.parametrize("sink", ["accept"], indirect=True)
@pytest.mark.parametrize("size", [5000, 50_000])
def test_a_stream_is_made_in_memory_or_beside_the_blob_by_size(
    sink: UploadSink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    from larder.client import remote as remote_module

    monkeypatch.setattr(remote_module, "IN_MEMORY_STREAM", 10_000)
    written: list[str] = []
    real_open = open

    def recording(path: object, mode: str = "r", *args: object) -> object:
        if "w" in mode:
            written.append(Path(str(path)).name)
        return real_open(path, mode, *args)  # type: ignore[call-overload]

    monkeypatch.setattr(remote_module, "open", recording, raising=False)
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(size // 2) * 2)
    remote = remote_module.Remote(sink.url, "t", 5.0, {})
    try:
        remote.put_blob(blake3.blake3(blob.read_bytes()).hexdigest(), blob, 1)
    finally:
        remote.close()
    [(_, coding, body)] = sink.blobs
    assert coding == "zstd" and decoded(body) == blob.read_bytes()
    assert written == ([] if size <= 10_000 else ["blob.zst"])
    assert list(tmp_path.iterdir()) == [blob]


@pytest.mark.parametrize("sink", ["accept"], indirect=True)
@pytest.mark.parametrize("counts", [True, False])
def test_a_miss_the_direct_lookup_counted_is_not_looked_up_again(
    sink: UploadSink, crate: Path, counts: bool
) -> None:
    sink.counts_misses = counts
    done = shim(crate, sink.url, LARDER_TOKEN="t")
    assert done.returncode == 0, done.stderr
    lookups = [r.split("/")[3] for r in sink.requests if r.startswith("GET")]
    assert lookups[0] == "direct"
    assert ("manifests" in lookups) is not counts, sink.requests
    assert stats(crate)["misses"] == 1


def enqueue_job(spool: Path, url: str, n: int, directory: Path) -> None:
    """Job ``n``: one output of ``1000 * (n + 1)`` random bytes, a manifest, a direct entry."""
    output = directory / f"lib{n}.rlib"
    output.write_bytes(os.urandom(1000 * (n + 1)))
    blob = blake3.blake3(output.read_bytes()).hexdigest()
    manifest = {"crate": f"c{n}", "outputs": [
        {"name": output.name, "blake3": blob, "size": 1000 * (n + 1), "mode": 0o644}],
        "stdout": "", "stderr": ""}  # fmt: skip
    job = {"url": url, "key": f"{n:064x}", "crate": f"c{n}", "blobs": [blob],
           "manifest": json.dumps(manifest), "direct_key": f"{n + 10:064x}",
           "direct_entry": json.dumps({"sources": ["src/lib.rs"], "env": []})}  # fmt: skip
    uploads.enqueue(spool, job, {blob: output}, {})


@pytest.mark.parametrize("sink", ["accept"], indirect=True)
def test_the_jobs_of_a_pass_share_one_connection_and_count_their_own_bytes(
    sink: UploadSink, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    spool = uploads.spool_dir(state, sink.url)
    for n in range(3):
        enqueue_job(spool, sink.url, n, tmp_path)
    env = {**os.environ, "LARDER_STATE_DIR": str(state), "LARDER_TOKEN": "t"}
    uploads.drain(spool, env)
    counted = json.loads((state / "stats.json").read_text())
    assert (counted["uploads"], counted.get("errors", 0)) == (3, 0), counted
    assert sink.connections == 1, sink.requests
    assert counted["bytes_up"] == sink.sent  # each job its own bytes, not the pass's so far
    assert uploads.pending(spool) == []


def _lingering(
    sink: UploadSink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, linger: float
) -> tuple[Path, Path, threading.Thread]:
    """A state directory, its spool holding one job, and an uploader draining it that lingers
    ``linger`` seconds."""
    monkeypatch.setattr(uploads, "LINGER", linger)
    state = tmp_path / "state"
    spool = uploads.spool_dir(state, sink.url)
    env = {**os.environ, "LARDER_STATE_DIR": str(state), "LARDER_TOKEN": "t"}
    enqueue_job(spool, sink.url, 0, tmp_path)
    uploader = threading.Thread(target=uploads.run, args=(spool, env))
    uploader.start()
    return state, spool, uploader


@pytest.mark.parametrize("sink", ["accept"], indirect=True)
def test_a_lingering_uploader_keeps_its_connection_for_the_next_job(
    sink: UploadSink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state, spool, uploader = _lingering(sink, tmp_path, monkeypatch, 3.0)
    for n in (1, 2):  # each job arrives once the one before it has been sent
        wait_until(lambda: not uploads.pending(spool), timeout=10)
        enqueue_job(spool, sink.url, n, tmp_path)
    uploader.join(timeout=30)
    counted = json.loads((state / "stats.json").read_text())
    assert (counted["uploads"], counted.get("errors", 0)) == (3, 0), counted
    assert sink.connections == 1, sink.requests


@pytest.mark.parametrize("sink", ["accept"], indirect=True)
def test_a_lingering_uploader_leaves_a_state_directory_made_again(
    sink: UploadSink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state directory removed and made again while its uploader lingers belongs to the
    next uploader: two on one spool took each other's jobs (counted as failed, never sent)."""
    state, spool, uploader = _lingering(sink, tmp_path, monkeypatch, 30.0)
    wait_until(lambda: not uploads.pending(spool), timeout=10)
    shutil.rmtree(state)
    spool.mkdir(parents=True)
    (spool / uploads.LOCK_FILE).touch()
    uploader.join(timeout=5)
    assert not uploader.is_alive(), "the uploader kept lingering on a spool made anew"


@pytest.mark.parametrize("sink", ["accept"], indirect=True)
def test_an_output_holding_a_local_path_is_never_uploaded(sink: UploadSink, crate: Path) -> None:
    here = str(crate / "src" / "data")
    (crate / "src" / "lib.rs").write_text('pub const HERE: &str = env!("LARDER_TEST_HERE");\n')
    done = shim(crate, sink.url, LARDER_TOKEN="t", LARDER_TEST_HERE=here)
    assert done.returncode == 0, done.stderr
    assert here.encode() in (crate / "out" / "libt-x.rlib").read_bytes()
    counted = stats(crate)
    assert counted["error_kinds"] == {"embeds-paths": 1}, counted
    assert counted["uploads"] == 0
    assert not [r for r in sink.requests if r.startswith("PUT")], sink.requests


@pytest.mark.parametrize("sink", ["accept"], indirect=True)
def test_an_output_holding_a_path_the_users_remap_shortened_is_never_uploaded(
    sink: UploadSink, crate: Path
) -> None:
    """``--remap-path-prefix=$HOME=~`` wins over the shim's remap of the checkout, so outputs
    hold ``~/<checkout>/...``: another checkout's outputs would differ under the same key."""
    (crate / "src" / "lib.rs").write_text("pub const HERE: &str = file!();\n")
    remap = f"--remap-path-prefix={crate.parent}=~"
    done = shim(crate, sink.url, remap, LARDER_TOKEN="t")
    assert done.returncode == 0, done.stderr
    assert f"~/{crate.name}/src/lib.rs".encode() in (crate / "out" / "libt-x.rlib").read_bytes()
    counted = stats(crate)
    assert counted["error_kinds"] == {"embeds-paths": 1}, counted
    assert not [r for r in sink.requests if r.startswith("PUT")], sink.requests


def test_one_pass_per_root_path_not_contained_in_another() -> None:
    from larder.client.leaks import fewest_needles

    roots = [b"/w/app", b"/w/app/target", b"/home/me/.cargo", b"/w/app", b"/opt/rust"]
    assert sorted(fewest_needles(roots)) == [b"/home/me/.cargo", b"/opt/rust", b"/w/app"]
    assert fewest_needles([b"/a/b"]) == [b"/a/b"]
    # A path merely containing another is no longer found by it (``/target`` is not a prefix
    # of ``/app/target``), so both are looked for.
    assert sorted(fewest_needles([b"/target", b"/app/target"])) == [b"/app/target", b"/target"]


def test_a_root_whose_name_extends_another_is_looked_for_too(tmp_path: Path) -> None:
    """A target directory /x/proj-target next to the checkout /x/proj is not under it:
    ``/x/proj`` does not find ``/x/proj-target/...`` in an output (``-`` continues the name),
    so dropping it as if it were under the checkout would upload an output naming it."""
    from larder.client.leaks import Needles, embeds, fewest_needles

    roots = [b"/x/proj", b"/x/proj-target", b"/x/proj/target"]
    assert sorted(fewest_needles(roots)) == [b"/x/proj", b"/x/proj-target"]
    output = tmp_path / "libx.rlib"
    output.write_bytes(b"head /x/proj-target/debug/build/x/out/gen.rs tail")
    assert embeds(output, Needles(fewest_needles(roots)))


@pytest.mark.parametrize(
    ("content", "found"),
    [
        (b"\0/target/debug/deps/x.rs\0", True),
        (b'"/target"', True),
        (b"/larder/target/debug/deps/x.rs", False),  # the shim's own remap of a root
        (b"./src/lib.rs", False),
        (b"src/builder/app_settings.rs", False),
        (b"/target2/x", False),
        (b"/a//target/x", False),
        (b"/larder/target/x /target/y", True),  # the second one counts
    ],
)
def test_a_short_root_is_found_only_as_a_path_of_its_own(
    tmp_path: Path, content: bytes, found: bool
) -> None:
    from larder.client.leaks import Needles, embeds

    output = tmp_path / "libx.rlib"
    output.write_bytes(b"head " + content + b" tail")
    assert embeds(output, Needles([b"/target", b"/src", b"/app"])) is found


def test_the_workspace_of_a_crate_compiled_outside_it_is_looked_for(tmp_path: Path) -> None:
    """A registry crate's ``env!`` value may name the workspace or a file in it: the workspace
    is looked for like any root, but rustdoc's ``</code>`` is not the path ``/code``. A remap
    of the user's own from the workspace writes the same in every checkout of one layout (the
    key holds where the crate sits below it); one from above it (``$HOME=~``) does not."""
    from larder.client.leaks import embeds, scan_needles

    spellings = (
        ("CWD", "/code/vendor/itoa-1.0.1"),
        ("TARGET", "/code/target"),
        ("CARGO_HOME", "/root/.cargo"),
        ("WORKSPACE", "/code"),
    )
    needles = scan_needles(spellings, [])
    assert b"/code" in needles.paths and b"/code/target" not in needles.paths  # found by /code
    output = tmp_path / "libx.rlib"
    for text, found in ((b"<p><code>x</code></p>", False), (b"ws=/code\0", True),
                        (b"at /code/config/app.toml\0", True), (b"'/code'", True)):  # fmt: skip
        output.write_bytes(b"head " + text + b" tail")
        assert embeds(output, needles) is found, text
    remapped = scan_needles(spellings, ["--remap-path-prefix=/code=/build"]).paths
    assert not [n for n in remapped if n.startswith(b"/build")]
    # Another root is a path wherever it is found, a closing tag included.
    output.write_bytes(b"head </code/vendor/itoa-1.0.1> tail")
    assert embeds(output, needles)
    app = (("CWD", "/app"), ("TARGET", "/app/target"), ("CARGO_HOME", "/root/.cargo"))
    output.write_bytes(b"root tag </app> here")
    assert embeds(output, scan_needles(app, []))
    home = (("CWD", "/h/u/.cargo/registry/src/x/itoa-1.0.1"), ("TARGET", "/h/u/a/ws/target"),
            ("CARGO_HOME", "/h/u/.cargo"), ("WORKSPACE", "/h/u/a/ws"))  # fmt: skip
    assert b"~/a/ws" in scan_needles(home, ["--remap-path-prefix=/h/u/=~/"]).paths  # as rustc


def test_a_users_remap_above_a_root_leaves_the_rest_of_its_path_to_find() -> None:
    from larder.client.leaks import remapped

    roots = ["/home/me/proj-a", "/home/me/proj-a/target", "/home/me/.cargo"]
    above = ["--remap-path-prefix=/home/me=~"]
    assert remapped(roots, above) == ["~/proj-a", "~/proj-a/target", "~/.cargo"]
    # From a root itself, or inside one, the rest is the same on every machine.
    assert remapped(roots, ["--remap-path-prefix", "/home/me/proj-a=/build"]) == []
    assert remapped(roots, ["--remap-path-prefix=/home/me/proj-a/src=s"]) == []
    assert remapped(roots, [*above, "--remap-path-prefix=/home/me/proj-a=/b"]) == ["~/.cargo"]
    assert remapped(roots, ["--remap-path-prefix=/opt=/o"]) == []
