"""``larder gc``, ``larder pin``/``unpin`` and ``larder cache limits`` against a real disk store."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from larder.core import keys
from larder.storage.disk import DiskStorage
from tests.core.gcworld import World, hash_part, world_on
from tests.service.test_cli import run


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    for name in os.environ:
        if name.startswith("LARDER_"):
            monkeypatch.delenv(name)
    return str(tmp_path / "data")


def populate(store: str, labels: tuple[str, ...] = ("a", "b", "c")) -> dict[str, list[str]]:
    """Push a closure per label (oldest first) and age everything by an hour, a minute apart."""

    async def go() -> dict[str, list[str]]:
        storage = DiskStorage(store)
        world: World = await world_on(storage)
        try:
            for label in labels:
                await world.push_closure(label)
            return world.pushed
        finally:
            world.executor.shutdown()
            await storage.close()

    pushed = asyncio.run(go())
    now = time.time()
    for index, label in enumerate(labels):
        for path in pushed[label]:
            age = now - 3600 + 60 * index
            os.utime(Path(store) / "objects" / keys.narinfo("main", hash_part(path)), (age, age))
    for path in Path(store).rglob("*"):
        if path.is_file() and not path.parts[-2].startswith("narinfo"):
            os.utime(path, (now - 7200, now - 7200))
    return pushed


def present(store: str, path: str) -> bool:
    return (Path(store) / "objects" / keys.narinfo("main", hash_part(path))).exists()


def tree(store: str) -> list[tuple[str, float]]:
    root = Path(store)
    return sorted((str(p.relative_to(root)), p.stat().st_mtime) for p in root.rglob("*"))


def test_gc_evicts_the_oldest_closure_to_fit(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    pushed = populate(store)
    code, out, _ = run(capsys, "gc", "--storage", store, "--dry-run", "--json")
    assert code == 0
    size = json.loads(out)["caches"]["main"]["size_before"]
    before = tree(store)
    code, out, _ = run(capsys, "gc", "--storage", store, "--dry-run", "--max-size", str(size - 1))
    assert code == 0 and "would evict" in out
    assert tree(store) == before, "a dry run changed the store"

    code, out, _ = run(capsys, "gc", "--storage", store, "--cache", "main",
                       "--max-size", str(size * 2 // 3 + 10), "--json")  # fmt: skip
    assert code == 0
    report = json.loads(out)
    assert report["caches"]["main"]["size_after"] <= size * 2 // 3 + 10
    assert not any(present(store, p) for p in pushed["a"])
    assert all(present(store, p) for p in pushed["b"] + pushed["c"])
    assert report["blobs_reaped"] == 3
    assert not (Path(store) / "objects" / keys.GC_LOCK).exists()
    assert json.loads((Path(store) / "objects" / keys.GC_LAST_RUN).read_text())["finished"] > 0


def test_gc_retention_and_cache_limits(store: str, capsys: pytest.CaptureFixture[str]) -> None:
    pushed = populate(store)
    code, out, _ = run(
        capsys, "cache", "limits", "main", "--retention", "3500s", "--storage", store
    )
    assert code == 0 and json.loads(out)["gc_retention"] == 3500
    code, out, _ = run(capsys, "gc", "--storage", store)
    assert code == 0, out
    # a is 60 minutes old, b 59, c 58: only c was used within the retention.
    assert not any(present(store, p) for p in pushed["a"] + pushed["b"])
    assert all(present(store, p) for p in pushed["c"])
    code, out, _ = run(capsys, "cache", "limits", "main", "--retention", "default", "--max-size",
                       "20GB", "--storage", store)  # fmt: skip
    shown = json.loads(out)
    assert shown["gc_retention"] is None and shown["gc_max_size"] == 20 * 10**9


def test_a_cache_limit_of_0_is_no_limit_and_default_gives_the_configured_one(
    store: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pushed = populate(store)
    for spelling in ("0", "0s", "none", "never"):
        code, out, _ = run(
            capsys, "cache", "limits", "main", "--retention", spelling, "--storage", store
        )
        assert code == 0 and json.loads(out)["gc_retention"] == 0, spelling
    monkeypatch.setenv("LARDER_GC_RETENTION", "1s")  # the other caches' retention
    assert run(capsys, "gc", "--storage", store)[0] == 0
    assert all(present(store, p) for p in pushed["a"] + pushed["b"] + pushed["c"])
    code, out, _ = run(capsys, "cache", "limits", "main", "--retention", "default",
                       "--max-size", "0", "--storage", store)  # fmt: skip
    shown = json.loads(out)
    assert shown["gc_retention"] is None and shown["gc_max_size"] == 0
    assert run(capsys, "gc", "--storage", store)[0] == 0
    assert not any(present(store, p) for p in pushed["a"] + pushed["b"] + pushed["c"])


def test_a_run_given_0_has_no_limit_as_a_cache_limit_of_0_has(
    store: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`larder gc --retention 0` took 0 for "not given", so the configured retention evicted
    what the operator meant to keep, the opposite of `cache limits --retention 0`."""
    pushed = populate(store)
    everything = pushed["a"] + pushed["b"] + pushed["c"]
    monkeypatch.setenv("LARDER_GC_RETENTION", "1s")
    monkeypatch.setenv("LARDER_GC_MAX_SIZE", "1")
    for spelling in ("0", "none", "never"):
        argv = ["gc", "--retention", spelling, "--max-size", spelling, "--storage", store]
        assert run(capsys, *argv)[0] == 0
        assert all(present(store, p) for p in everything), spelling
    assert run(capsys, "gc", "--retention", "default", "--storage", store)[0] == 0
    assert not any(present(store, p) for p in everything)


def test_pins_protect_a_closure(store: str, capsys: pytest.CaptureFixture[str]) -> None:
    pushed = populate(store)
    top = pushed["a"][-1]
    code, _, err = run(capsys, "pin", top, "--note", "release 1.0", "--storage", store)
    assert code == 0 and "pinned" in err
    code, out, _ = run(capsys, "pin", "--storage", store)
    assert out.split("\n")[0] == f"{top}  release 1.0"
    assert run(capsys, "gc", "--storage", store, "--max-size", "1")[0] == 0
    assert all(present(store, p) for p in pushed["a"])
    assert not any(present(store, p) for p in pushed["b"] + pushed["c"])
    code, _, err = run(capsys, "unpin", top.rsplit("/", 1)[1], "--storage", store)
    assert code == 0 and "unpinned" in err
    assert run(capsys, "pin", "--storage", store)[1] == ""
    assert run(capsys, "gc", "--storage", store, "--max-size", "1")[0] == 0
    assert not any(present(store, p) for p in pushed["a"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["gc", "--max-size", "lots"], "not a limit"),
        (["gc", "--retention", "forever-ish"], "not a limit"),
        (["gc", "--grace", "0"], "gc_grace"),
        (["gc", "--cache", "nope"], "no cache named 'nope'"),
        (["gc", "--cache", "../x"], "cache name"),
        (["pin", "/etc/passwd"], "not in /nix/store"),
        (["pin", "--cache", "nope", "0" * 32], "no cache named"),
        (["cache", "limits", "main", "--max-size", "-5"], "not a limit"),
    ],
)
def test_bad_input_is_a_clear_error_and_changes_nothing(
    store: str, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    populate(store, ("a",))
    before = tree(store)
    code, _, err = run(capsys, *argv, "--storage", store)
    assert code == 2 and message in err, err
    assert tree(store) == before


def test_gc_refuses_while_another_collection_holds_the_lease(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    populate(store, ("a",))
    lock = Path(store) / "objects" / keys.GC_LOCK
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({"owner": "x", "host": "elsewhere", "pid": 7, "since": 1}))
    code, _, err = run(capsys, "gc", "--storage", store, "--max-size", "1")
    assert code == 2 and "another collection is running (host elsewhere" in err
    os.utime(lock, (time.time() - 3600, time.time() - 3600))  # its holder died long ago
    assert run(capsys, "gc", "--storage", store, "--max-size", "1")[0] == 0
    assert not lock.exists()


def test_a_reader_that_goes_away_ends_the_command_quietly(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`larder gc --json | head`: no BrokenPipeError traceback on stderr."""
    populate(store)
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte
    try:
        done = subprocess.run(
            [sys.executable, "-m", "larder", "gc", "--json", "--dry-run", "--storage", store],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write)
    assert done.returncode == 1 and done.stderr == ""


def test_verify_finds_a_damaged_blob_and_repair_makes_its_path_missing(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    pushed = populate(store, ("a",))
    code, out, _ = run(capsys, "verify", "--storage", store)
    assert code == 0 and "checked 3 blobs" in out and "everything is sound" in out
    blobs = sorted(p for p in (Path(store) / "blobs").rglob("*") if p.is_file())
    assert len(blobs) == 3
    blobs[0].write_bytes(blobs[0].read_bytes()[:-5])  # cut short
    before = tree(store)
    code, out, _ = run(capsys, "verify", "--storage", store)
    assert code == 1 and "damaged: 1 blobs, 2 objects" in out and "--repair" in out
    assert "checked 3 blobs" in out  # the damaged one too
    assert tree(store) == before
    code, out, _ = run(capsys, "verify", "--repair", "--json", "--storage", store)
    report = json.loads(out)
    assert code == 1 and len(report["removed"]) == 3 and report["repaired"] is True
    assert sum(present(store, path) for path in pushed["a"]) == 2
    code, out, _ = run(capsys, "verify", "--storage", store)
    assert code == 0 and "checked 2 blobs" in out
