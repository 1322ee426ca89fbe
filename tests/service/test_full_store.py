"""A full store: uploads refused at once with 507, reads and readiness unaffected, one error
logged a minute."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import pytest

from larder.errors import StorageFull
from larder.service import errors as service_errors
from larder.service import state
from larder.service.routes import bodies
from larder.storage.base import Storage
from larder.storage.disk import DiskStorage
from larder.storage.memory import MemoryStorage
from tests.service.conftest import Live, ServiceFactory
from tests.service.test_fastpath import Conn, get

CRLF = "\r\n"


class Full(MemoryStorage):
    """Memory storage with ``free`` bytes left, taking nothing below a floor of 1 byte (as a
    disk takes nothing with less than :data:`larder.storage.disk.ROOM_FLOOR` free)."""

    free = 0
    noted: float | None = None

    async def room_for(self, size: int) -> bool:
        return max(size, 1) <= self.free

    async def note_full(self) -> None:
        self.noted = time.time()

    async def full_since(self) -> float | None:
        return self.noted

    async def check(self) -> None:
        raise StorageFull("no space left on device")  # as a disk's probe file finds it


@pytest.fixture
def storage() -> Storage:
    return Full()


def nar_put(token: str, size: int, expect: bool = False, suffix: str = ".nar") -> bytes:
    """A NAR upload's head declaring ``size`` bytes, without its body."""
    return (
        f"PUT /main/nar/{'0' * 52}{suffix} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Length: {size}\r\n{'Expect: 100-continue' + CRLF if expect else ''}\r\n"
    ).encode()


async def test_an_upload_the_store_has_no_room_for_is_refused_before_its_body(
    live: Live,
) -> None:
    """Nix 2.8 sends its upload again after a 5xx, without the body: larder waited for it for
    ``body_idle_timeout`` (60 s) and answered 408, four times, before Nix gave up."""
    for expect in (False, True):
        conn = await Conn.open(live)
        conn.send(nar_put(live.token, 1000, expect))  # and no body
        status, headers, body = await asyncio.wait_for(conn.response(), 2)
        assert status == 507 and b"storage is full" in body, body
        assert headers["cache-control"] == "no-store"
        conn.close()
    storage = live.app[state.STORAGE].inner
    assert isinstance(storage, Full)
    assert [key async for key in storage.keys("")] == [k async for k in storage.keys("config/")]
    storage.free = 10**6  # room again: the same upload is read (and refused for its bytes)
    conn = await Conn.open(live)
    conn.send(nar_put(live.token, 3) + b"abc")
    status, _, body = await asyncio.wait_for(conn.response(), 5)
    assert status == 400, body
    conn.close()


async def test_only_a_body_stored_at_least_as_large_as_sent_is_judged_by_its_size(
    live: Live,
) -> None:
    """A ``.nar`` is stored packed, often far smaller than sent: refusing it for a declared
    size above the free space refused uploads that fitted. A ``.nar.zst`` is kept as sent (and
    xz packs tighter than what larder stores): one larger than the free space cannot fit. A
    request storing nothing (a rustc miss report) is never refused for room."""
    storage = live.app[state.STORAGE].inner
    assert isinstance(storage, Full)
    storage.free = 4000
    for suffix, refused in ((".nar", False), (".nar.zst", True), (".nar.xz", True)):
        conn = await Conn.open(live)
        conn.send(nar_put(live.token, 5000, suffix=suffix) + b"x" * 5000)
        status, _, body = await asyncio.wait_for(conn.response(), 5)
        assert (status == 507) is refused, (suffix, status, body)
        conn.close()
    storage.free = 0
    conn = await Conn.open(live)
    report = b'{"crate": "a", "category": "source"}'
    conn.send(
        f"POST /main/rustc/explained HTTP/1.1\r\nHost: x\r\nContent-Length: {len(report)}\r\n"
        "Content-Type: application/json\r\n\r\n".encode()
        + report
    )
    status_line = await asyncio.wait_for(conn.reader.readline(), 5)
    assert status_line.startswith(b"HTTP/1.1 204 "), status_line  # 204: no body to read
    conn.close()


async def test_after_a_write_found_the_store_full_any_upload_too_large_is_refused_early(
    live: Live,
) -> None:
    """Nix 2.8 sends an upload refused with 507 again without its body. A ``.nar`` of data that
    packs no smaller was read whole, found no room, and its body-less retries waited for
    ``body_idle_timeout`` (408, minutes). Early refusals are no writes that found it full: they
    do not start the window again (a client retrying kept a fitting ``.nar`` refused)."""
    storage = live.app[state.STORAGE].inner
    assert isinstance(storage, Full)
    storage.free = 4000
    conn = await Conn.open(live)
    conn.send(nar_put(live.token, 5000))  # no body: taken as a .nar, it waits for one
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(conn.response(), 0.5)
    conn.close()
    conn = await Conn.open(live)
    conn.send(nar_put(live.token, 5000, suffix=".nar.zst"))  # refused early: no write
    assert (await asyncio.wait_for(conn.response(), 5))[0] == 507
    conn.close()
    assert storage.noted is None
    await live.app[state.STORAGE].note_full()  # as a write finding no room does
    conn = await Conn.open(live)
    conn.send(nar_put(live.token, 5000))  # the retry, without its body: told at once
    status, _, body = await asyncio.wait_for(conn.response(), 5)
    assert status == 507 and b"storage is full" in body
    conn.close()
    storage.noted = time.time() - bodies.FULL_MEMORY - 1  # long ago: taken again
    conn = await Conn.open(live)
    conn.send(nar_put(live.token, 5000))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(conn.response(), 0.5)
    conn.close()


async def test_a_write_that_finds_the_store_full_is_noted_for_every_process(
    tmp_path: Path, make_service: ServiceFactory
) -> None:
    """The note is the store's (a file's date on disk), so that every worker reads it."""

    class FillsUp(MemoryStorage):
        noted = False

        async def put(self, key: str, data: bytes) -> None:
            if "/sccache/" in key:  # the entry's record, after its blob
                raise StorageFull("disk storage: put: no space left on device")
            await super().put(key, data)

        async def note_full(self) -> None:
            self.noted = True

    storage = FillsUp()
    service = await make_service(storage)
    resp = await service.client.put("/main/sccache/a/b/c/entry", data=b"x" * 100,
                                    headers=service.auth())  # fmt: skip
    assert resp.status == 507 and storage.noted
    disk = DiskStorage(tmp_path / "store")
    assert await disk.full_since() is None
    await disk.note_full()
    since = await disk.full_since()
    assert since is not None and abs(since - time.time()) < 5
    assert await DiskStorage(tmp_path / "store").full_since() == since  # another process's view


async def test_a_full_store_stays_ready_and_logs_one_error_a_minute(
    live: Live, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads work on a full store: a readiness probe that failed took every replica out of
    service. Each refused upload logged an error: hundreds a build."""
    monkeypatch.setattr(service_errors, "_full_logged", [-service_errors.FULL_LOG_INTERVAL])
    conn = await Conn.open(live)
    conn.send(get("/readyz"))
    status, _, body = await conn.response()
    assert (status, body) == (200, b"ready; storage full\n")
    with caplog.at_level(logging.INFO, logger="larder.http"):
        for _ in range(3):
            conn.send(nar_put(live.token, 1000))
            assert (await conn.response())[0] == 507
            conn.close()
            conn = await Conn.open(live)
    levels = [r.levelname for r in caplog.records if "no room for a body" in r.getMessage()]
    assert levels == ["ERROR", "INFO", "INFO"], levels
    conn.send(nar_put(live.token, 2 * 1024**2, expect=True))  # as curl, so Nix, sends a NAR
    assert (await conn.response())[0] == 507
    conn.close()
    metrics = (await _scrape(live)).splitlines()
    counted = 'larder_upload_requests_total{cache="main",outcome="storage_full",protocol="nix"}'
    assert f"{counted} 4.0" in metrics


async def _scrape(live: Live) -> str:
    conn = await Conn.open(live)
    conn.send(get("/metrics"))
    _, _, body = await conn.response()
    conn.close()
    return body.decode()


def test_a_disk_has_no_room_past_its_free_blocks_or_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = DiskStorage(tmp_path / "store")
    real = os.statvfs(tmp_path)
    numbers = {name: getattr(real, name) for name in dir(real) if name.startswith("f_")}

    def statvfs(blocks: int, files: int, counted: int = 1000) -> object:
        fields = {**numbers, "f_frsize": 4096, "f_bavail": blocks, "f_bfree": blocks,
                  "f_files": counted, "f_favail": files, "f_ffree": files}  # fmt: skip
        return type("Stat", (), fields)()

    for blocks, files, counted, size, fits in (
        (500, 5, 1000, 2_000_000, True),  # 2,048,000 bytes free
        (488, 5, 1000, 2_000_000, False),  # 1,998,848
        (300, 5, 1000, 0, True),  # 1.2 MB free: room for something
        (200, 5, 1000, 0, False),  # 819,200: below the floor, room for nothing
        (500, 0, 1000, 0, False),  # no file left for its temporary
        (500, 0, 0, 0, True),  # a file system that counts no files (btrfs)
    ):
        monkeypatch.setattr(os, "statvfs", lambda _, b=blocks, f=files, c=counted: statvfs(b, f, c))
        assert asyncio.run(disk.room_for(size)) is fits, (blocks, files, counted, size)
    unknown = {**numbers, "f_blocks": 0, "f_bavail": 0, "f_bfree": 0, "f_files": 0}
    monkeypatch.setattr(os, "statvfs", lambda _: type("Stat", (), unknown)())
    assert asyncio.run(disk.room_for(10**9))  # counts nothing (some FUSE mounts): room
