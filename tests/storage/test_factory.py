"""``open_storage``: the one place a URL chooses a backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from larder.storage import open_storage
from larder.storage.disk import DiskStorage
from larder.storage.factory import parse_s3_url
from larder.storage.memory import MemoryStorage
from larder.storage.s3 import S3Storage


async def test_memory() -> None:
    storage = open_storage("memory://")
    assert isinstance(storage, MemoryStorage)
    assert storage.backend == "memory"


async def test_directory_path(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path / "data"), zstd_level=9)
    assert isinstance(storage, DiskStorage)
    assert storage.backend == "disk"
    assert storage.root == tmp_path / "data"
    assert (tmp_path / "data" / "blobs").is_dir()


async def test_relative_directory_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    storage = open_storage("./larder-data")
    assert isinstance(storage, DiskStorage)
    assert (tmp_path / "larder-data" / "objects").is_dir()


async def test_file_url(tmp_path: Path) -> None:
    storage = open_storage(f"file://{tmp_path}/with%20space")
    assert isinstance(storage, DiskStorage)
    assert storage.root == tmp_path / "with space"


@pytest.mark.parametrize("url", ["file://otherhost/data", "file:///x?y=1", "ftp://host/x", ""])
def test_bad_urls(url: str) -> None:
    with pytest.raises(ValueError):
        open_storage(url)


def test_bad_zstd_level(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        open_storage(str(tmp_path), zstd_level=99)


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [
        ("s3://my-bucket", "my-bucket", ""),
        ("s3://my-bucket/", "my-bucket", ""),
        ("s3://my.bucket.1/team", "my.bucket.1", "team/"),
        ("s3://abc/team/cache/", "abc", "team/cache/"),
        ("S3://abc/x", "abc", "x/"),
    ],
)
async def test_s3_urls(url: str, bucket: str, prefix: str, aws_env: None) -> None:
    assert parse_s3_url(url) == (bucket, prefix)
    storage = open_storage(url, zstd_level=1)
    try:
        assert isinstance(storage, S3Storage)
        assert storage.backend == "s3"
        assert (storage.bucket, storage.prefix) == (bucket, prefix)
    finally:
        await storage.close()


@pytest.mark.parametrize(
    "url",
    [
        "s3://",
        "s3:///prefix",
        "s3://ab",
        "s3://Upper",
        "s3://bad_end-",
        "s3://-start",
        "s3://has space",
        "s3://a..b",
        "s3://bucket:9000/x",
        "s3://user@bucket/x",
        "s3://bucket/../x",
        "s3://bucket/a//b",
        "s3://bucket/x?versionId=1",
        "s3://bucket/x#frag",
        "s3://" + "b" * 64,
    ],
)
def test_bad_s3_urls(url: str) -> None:
    with pytest.raises(ValueError):
        open_storage(url)
