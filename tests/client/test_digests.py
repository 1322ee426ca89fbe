"""A file's digest is remembered by its signature only while that signature stands for its
content, and the calls of a build share what they hashed through the state directory."""

from __future__ import annotations

import os
import time
from pathlib import Path

import blake3
import pytest

from larder.client import digests
from larder.client.digests import Memo


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths actually read and hashed, in order."""
    calls: list[str] = []
    real = digests.hash_file

    def counting(path: str | Path) -> str:
        calls.append(str(path))
        return real(path)

    monkeypatch.setattr(digests, "hash_file", counting)
    return calls


def settled(path: Path, data: bytes) -> Path:
    """``path`` written with ``data`` a little while ago (past any clock step)."""
    path.write_bytes(data)
    time.sleep(0.03)
    return path


def blake(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def test_an_unchanged_file_is_hashed_once(tmp_path: Path, hashed: list[str]) -> None:
    memo = Memo(racy_ns=10_000_000)
    lib = settled(tmp_path / "libdep.rmeta", b"metadata" * 1000)
    assert memo.digest(lib) == memo.digest(lib) == blake(b"metadata" * 1000)
    assert hashed == [str(lib)]


def test_a_file_written_in_place_is_hashed_again(tmp_path: Path, hashed: list[str]) -> None:
    memo = Memo(racy_ns=10_000_000)
    lib = settled(tmp_path / "libdep.rlib", b"A" * 4096)
    assert memo.digest(lib) == blake(b"A" * 4096)
    time.sleep(0.03)
    with open(lib, "r+b") as handle:  # same inode, same size, new bytes
        handle.write(b"B" * 4096)
    assert memo.digest(lib) == blake(b"B" * 4096)
    assert len(hashed) == 2


def test_a_file_replaced_by_rename_is_hashed_again(tmp_path: Path, hashed: list[str]) -> None:
    memo = Memo(racy_ns=10_000_000)
    lib = settled(tmp_path / "libdep.rlib", b"old")
    assert memo.digest(lib) == blake(b"old")
    os.replace(settled(tmp_path / "new", b"new"), lib)
    assert memo.digest(lib) == blake(b"new")
    assert len(hashed) == 2


def test_a_file_that_just_changed_is_not_remembered(tmp_path: Path, hashed: list[str]) -> None:
    """Within the racy window a second write could keep the signature: hash every time."""
    memo = Memo(racy_ns=3_600_000_000_000)
    out = tmp_path / "libfresh.rmeta"
    out.write_bytes(b"fresh")
    assert memo.digest(out) == memo.digest(out) == blake(b"fresh")
    assert len(hashed) == 2
    assert memo.known == {}


def test_a_file_changing_while_hashed_is_not_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    memo = Memo(racy_ns=10_000_000)
    lib = settled(tmp_path / "libdep.rlib", b"first")
    real = digests.hash_file

    def racing(path: str | Path) -> str:
        digest = real(path)
        with open(path, "ab") as handle:  # rustc still writing
            handle.write(b" and more")
        return digest

    monkeypatch.setattr(digests, "hash_file", racing)
    memo.digest(lib)
    assert memo.known == {}


def test_whole_second_time_stamps_get_a_wider_window() -> None:
    """FAT, ext3 and the like keep seconds: a second write may keep the stamp for up to two."""
    assert digests.racy_window(1_700_000_000_123_456_789) == digests.RACY_NS
    assert digests.racy_window(1_700_000_000_000_000_000) == digests.COARSE_RACY_NS
    assert digests.COARSE_RACY_NS > 2_000_000_000


def test_calls_share_digests_through_the_state_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "state" / digests.LOG_NAME
    log.parent.mkdir()
    lib = settled(tmp_path / "libserde.rmeta", b"serde" * 500)
    first = Memo(log, racy_ns=10_000_000)
    expected = first.digest(lib)
    second = Memo(log, racy_ns=10_000_000)
    second.refresh()

    def never(path: str | Path) -> str:
        raise AssertionError(f"{path} hashed again")

    monkeypatch.setattr(digests, "hash_file", never)
    assert second.digest(lib) == expected
    assert log.stat().st_mode & 0o777 == 0o600


def test_lines_that_do_not_parse_are_skipped(tmp_path: Path) -> None:
    log = tmp_path / digests.LOG_NAME
    good = "1 2 3 4 5 " + "a" * 64
    log.write_text(
        "\n".join(
            [
                "garbage",
                "1 2 3 4 " + "b" * 64,  # a field short
                "1 2 3 4 6 0x" + "d" * 62,  # not lowercase hex
                "1 2 3 4 7 " + "E" * 64,
                good,
                "9 9 9 9 9 " + "f" * 30,  # still being appended: no newline yet
            ]
        )
    )
    memo = Memo(log)
    memo.refresh()
    assert memo.known == {b"1 2 3 4 5": b"a" * 64}
    with open(log, "a") as handle:
        handle.write("f" * 34 + "\n")
    memo.refresh()
    assert memo.known[b"9 9 9 9 9"] == b"f" * 64


def test_a_log_past_its_limit_starts_afresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / digests.LOG_NAME
    log.write_text("".join(f"1 {n} 3 4 5 {'a' * 64}\n" for n in range(100)))
    memo = Memo(log)
    memo.refresh()
    assert len(memo.known) == 100
    with open(log, "a") as handle:
        handle.write("".join(f"2 {n} 3 4 5 {'b' * 64}\n" for n in range(100)))
    monkeypatch.setattr(digests, "MAX_LOG", 1000)
    memo.refresh()
    assert log.stat().st_size == 0
    assert len(memo.known) == 100  # what it knew stays; the lines past the limit are dropped
    log.write_text(f"3 1 3 4 5 {'c' * 64}\n")  # a log begun again by another process
    memo.refresh()
    assert memo.known[b"3 1 3 4 5"] == b"c" * 64


def test_attach_reads_what_was_appended_since(
    tmp_path: Path, hashed: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(digests, "_memo", Memo())
    state = tmp_path / "state"
    state.mkdir()
    lib = settled(tmp_path / "libc.so.6", b"\x7fELF" * 100)
    other = Memo(state / digests.LOG_NAME, racy_ns=10_000_000)
    expected = other.digest(lib)
    digests.attach(state)
    assert digests.file_digest(lib) == expected
    assert hashed == [str(lib)]  # by the other process only


def test_a_log_another_user_owns_is_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / digests.LOG_NAME
    log.write_text(f"1 2 3 4 5 {'a' * 64}\n")
    memo = Memo(log)
    monkeypatch.setattr(digests.os, "getuid", lambda: log.stat().st_uid + 1)
    memo.refresh()
    assert memo.known == {}
    monkeypatch.undo()
    memo.refresh()
    assert memo.known == {b"1 2 3 4 5": b"a" * 64}
