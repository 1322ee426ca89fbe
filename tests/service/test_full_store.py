"""A full store: uploads refused at once with 507, reads and readiness unaffected, one error
logged a minute."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from larder.errors import StorageFull
from larder.service import errors as service_errors
from larder.service import state
from larder.storage.base import Storage
from larder.storage.disk import DiskStorage
from larder.storage.memory import MemoryStorage
from tests.service.conftest import Live
from tests.service.test_fastpath import Conn, get

CRLF = "\r\n"


class Full(MemoryStorage):
    """Memory storage with no room for anything larger than ``room`` bytes."""

    room = 0

    async def room_for(self, size: int) -> bool:
        return size <= self.room

    async def check(self) -> None:
        raise StorageFull("no space left on device")  # as a disk's probe file finds it


@pytest.fixture
def storage() -> Storage:
    return Full()


def nar_put(token: str, size: int, expect: bool = False) -> bytes:
    """A NAR upload's head declaring ``size`` bytes, without its body."""
    return (
        f"PUT /main/nar/{'0' * 52}.nar HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
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
    storage.room = 10**6  # room again: the same upload is read (and refused for its bytes)
    conn = await Conn.open(live)
    conn.send(nar_put(live.token, 3) + b"abc")
    status, _, body = await asyncio.wait_for(conn.response(), 5)
    assert status == 400, body
    conn.close()


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
    conn.close()
    metrics = (await _scrape(live)).splitlines()
    counted = 'larder_upload_requests_total{cache="main",outcome="storage_full",protocol="nix"}'
    assert f"{counted} 3.0" in metrics


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

    for blocks, files, counted, fits in (
        (10, 5, 1000, True),  # 40,960 bytes free
        (9, 5, 1000, False),  # 36,864
        (10, 0, 1000, False),  # no file left for its temporary
        (10, 0, 0, True),  # a file system that counts no files (btrfs)
    ):
        monkeypatch.setattr(os, "statvfs", lambda _, b=blocks, f=files, c=counted: statvfs(b, f, c))
        assert asyncio.run(disk.room_for(40_000)) is fits, (blocks, files, counted)
