"""Byte ranges of a stored NAR, the same on disk (``sendfile``) and on other storage (streamed).

RFC 9110 §14: one byte range is answered 206; an unsatisfiable one 416 with ``bytes */size``;
a field that is not the grammar, another unit, several ranges, a ``HEAD``, and a range behind an
``If-Range`` that does not hold are ignored (200, whole body).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from larder.protocol import narinfo
from larder.service.routes.ranges import Unsatisfiable, byte_range
from larder.storage.disk import DiskStorage
from tests.service.conftest import Service, ServiceFactory
from tests.service.test_nix_routes import hash_part, make_nar, push, store_path

SIZE = 1000


@pytest.mark.parametrize(
    ("value", "span"),
    [
        ("bytes=0-0", (0, 1)),
        ("bytes=10-99", (10, 100)),
        ("BYTES=10-99", (10, 100)),
        ("bytes=990-", (990, SIZE)),
        ("bytes=990-5000", (990, SIZE)),
        ("bytes=0-" + "9" * 5000, (0, SIZE)),
        ("bytes=-1", (SIZE - 1, SIZE)),
        ("bytes=-5000", (0, SIZE)),
        ("bytes=-" + "9" * 5000, (0, SIZE)),
        ("bytes=, 10-19 ,", (10, 20)),
        ("bytes=5-1", None),
        ("bytes= 0 - 5", None),
        ("bytes=0x10-", None),
        ("bytes=1.5-3", None),
        ("bytes=\u0661-", None),  # an Arabic-Indic digit
        ("bytes=0-1,2-3", None),
        ("bytes=", None),
        ("bytes", None),
        ("bytes=-", None),
        ("bytes=0--1", None),
        ("items=0-5", None),
    ],
)
def test_byte_range_reads_one_range_and_ignores_the_rest(
    value: str, span: tuple[int, int] | None
) -> None:
    assert byte_range(value, SIZE) == span


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("bytes=1000-", 1000),
        ("bytes=" + "9" * 5000 + "-", 1000),
        ("bytes=-0", 1000),
        ("bytes=-5", 0),
    ],
)
def test_unsatisfiable_ranges(value: str, size: int) -> None:
    with pytest.raises(Unsatisfiable):
        byte_range(value, size)


@pytest.fixture(params=["disk", "memory"])
async def stored(
    request: pytest.FixtureRequest, make_service: ServiceFactory, tmp_path: Path
) -> tuple[Service, str, bytes]:
    """A service, the URL of a NAR it serves and that NAR's stored bytes."""
    storage = DiskStorage(tmp_path / "data") if request.param == "disk" else None
    service = await make_service(storage)
    path = store_path("ranged-1.0")
    await push(service, path, make_nar(os.urandom(50_000)))
    resp = await service.client.get(f"/main/{hash_part(path)}.narinfo")
    url = "/main/" + narinfo.parse(await resp.read()).url
    whole = await service.client.get(url)
    return service, url, await whole.read()


async def test_one_range_is_206(stored: tuple[Service, str, bytes]) -> None:
    service, url, body = stored
    for value, span in (("bytes=10-99", (10, 100)), ("bytes=-7", (len(body) - 7, len(body)))):
        resp = await service.client.get(url, headers={"Range": value})
        assert resp.status == 206
        assert await resp.read() == body[span[0] : span[1]]
        assert resp.headers["Content-Range"] == f"bytes {span[0]}-{span[1] - 1}/{len(body)}"


@pytest.mark.parametrize(
    ("value", "status"),
    [
        ("bytes=-0", 416),
        ("bytes=999999-", 416),
        ("bytes=" + "9" * 5000 + "-", 416),
        ("bytes", 200),
        ("bytes= 0 - 5", 200),
        ("bytes=5-1", 200),
        ("items=0-5", 200),
        ("bytes=0-1,2-3,4-5", 200),
        ("bytes=0x10-", 200),
    ],
)
async def test_a_range_not_served_is_416_or_the_whole_body(
    stored: tuple[Service, str, bytes], value: str, status: int
) -> None:
    """Unsatisfiable: 416 with the length; not taken (another unit, not the grammar, several
    ranges): 200 and the whole body."""
    service, url, body = stored
    resp = await service.client.get(url, headers={"Range": value})
    assert resp.status == status
    if status == 416:
        assert resp.headers["Content-Range"] == f"bytes */{len(body)}"
    else:
        assert await resp.read() == body


async def test_head_and_if_range_with_an_entity_tag_get_the_whole_body(
    stored: tuple[Service, str, bytes],
) -> None:
    service, url, body = stored
    head = await service.client.head(url, headers={"Range": "bytes=0-9"})
    assert head.status == 200 and head.headers["Content-Length"] == str(len(body))
    tagged = await service.client.get(url, headers={"Range": "bytes=0-9", "If-Range": '"other"'})
    assert tagged.status == 200 and await tagged.read() == body
