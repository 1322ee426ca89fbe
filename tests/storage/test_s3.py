"""What only the S3 backend does: multipart uploads, its layout, and translating failures."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import zstandard
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

import larder.storage.s3 as s3_module
from larder.errors import StorageError, StorageFull, StorageUnavailable
from larder.storage.base import BlobInfo, Storage
from larder.storage.factory import open_storage
from larder.storage.s3 import MIN_PART_SIZE, S3Storage, _translate_errors
from tests.storage.helpers import (
    S3_PREFIX,
    S3Bucket,
    blob_id_of,
    decompress,
    mixed_data,
    read_stored,
    write_blob,
)

pytestmark = pytest.mark.s3

MiB = 1024 * 1024


# -- multipart uploads ---------------------------------------------------------------------


async def test_multipart_upload(s3_bucket: S3Bucket) -> None:
    storage = s3_bucket.make_storage(part_size=MIN_PART_SIZE)
    data = os.urandom(12 * MiB)  # incompressible: about 12 MiB stored, three parts
    writer = await asyncio.to_thread(storage.blob_writer)
    try:
        await asyncio.to_thread(writer.write, data[: 6 * MiB])
        # parts go out as they fill: an upload is in progress under tmp/, nothing under blobs/
        uploads = await asyncio.to_thread(s3_bucket.uploads)
        assert len(uploads) == 1 and uploads[0].startswith(S3_PREFIX + "tmp/")
        assert await asyncio.to_thread(s3_bucket.keys) == []
        await asyncio.to_thread(writer.write, data[6 * MiB :])
        info = await asyncio.to_thread(writer.commit)
    finally:
        await asyncio.to_thread(writer.abort)
        await storage.close()

    assert info == BlobInfo(blob_id_of(data), len(data), info.stored_size)
    assert info.stored_size > 12 * MiB
    assert await asyncio.to_thread(s3_bucket.keys) == [
        f"{S3_PREFIX}blobs/{info.blob_id[:2]}/{info.blob_id}"
    ]
    assert await asyncio.to_thread(s3_bucket.uploads) == []

    storage = s3_bucket.make_storage()
    try:
        stored = await read_stored(storage, info.blob_id)
        assert len(stored) == info.stored_size
        assert decompress(stored) == data
        middle = await read_stored(storage, info.blob_id, 5 * MiB - 3, 10 * MiB + 3)
        assert middle == stored[5 * MiB - 3 : 10 * MiB + 3]
    finally:
        await storage.close()


async def test_multipart_of_existing_blob(s3_bucket: S3Bucket) -> None:
    storage = s3_bucket.make_storage(part_size=MIN_PART_SIZE)
    data = os.urandom(11 * MiB)
    try:
        first = await write_blob(storage, data, piece=MiB)
        second = await write_blob(storage, data, piece=3 * MiB)
        assert first == second
        assert await asyncio.to_thread(s3_bucket.keys) == [
            f"{S3_PREFIX}blobs/{first.blob_id[:2]}/{first.blob_id}"
        ]
        assert await asyncio.to_thread(s3_bucket.uploads) == []
    finally:
        await storage.close()


@pytest.mark.parametrize("size", [300_000, 11 * MiB])  # one PutObject, a multipart upload
async def test_a_store_that_does_not_date_self_copies_still_gets_blobs_refreshed(
    s3_bucket: S3Bucket, caplog: pytest.LogCaptureFixture, size: int
) -> None:
    """s3rver answers a copy of an object onto itself and keeps its ``LastModified``: a blob
    committed again must still count as new for a collection that listed it before, so the
    refresh goes through a copy under ``tmp/`` and back (once found out: directly after)."""
    storage = s3_bucket.make_storage(part_size=MIN_PART_SIZE)
    data = mixed_data(size, seed=41)
    try:
        first = await write_blob(storage, data, piece=MiB)
        [listed] = [blob async for blob in storage.blob_infos()]
        await asyncio.sleep(2.1)  # S3 keeps whole seconds; past the margin of a fresh blob
        client = storage._slow_client
        real_copy = client.copy_object
        self_copies: list[str] = []

        def copy_object(**kwargs: Any) -> Any:
            if kwargs["CopySource"]["Key"] != kwargs["Key"]:
                return real_copy(**kwargs)
            self_copies.append(kwargs["Key"])  # answered, and nothing done
            head = s3_bucket.client.head_object(Bucket=s3_bucket.name, Key=kwargs["Key"])
            return {
                "CopyObjectResult": {"ETag": head["ETag"], "LastModified": head["LastModified"]},
                "ResponseMetadata": {"HTTPHeaders": {"date": formatdate(usegmt=True)}},
            }

        client.copy_object = copy_object  # type: ignore[method-assign]
        again = await write_blob(storage, data, piece=MiB)
        assert again.stored_sha256 == first.stored_sha256
        assert not await storage.blob_delete_if_older(first.blob_id, listed.modified + 1e-3)
        assert decompress(await read_stored(storage, first.blob_id)) == data
        key = f"{S3_PREFIX}blobs/{first.blob_id[:2]}/{first.blob_id}"
        head = s3_bucket.client.head_object(Bucket=s3_bucket.name, Key=key)
        assert first.stored_sha256 is not None
        assert head["Metadata"] == {"sha256": first.stored_sha256.hex()}
        assert head["ContentType"] == "application/zstd"
        await write_blob(storage, data, piece=MiB)
        assert self_copies == [key]  # the third commit goes through tmp/ at once
        assert caplog.text.count("does not date an object copied onto itself") == 1
        assert await asyncio.to_thread(s3_bucket.keys) == [key]
        assert await asyncio.to_thread(s3_bucket.uploads) == []
    finally:
        await storage.close()


def delayed_copies(
    storage: S3Storage, delay: float, fails: bool = False
) -> tuple[list[str], threading.Event]:
    """Record the key of each copy; the first takes ``delay`` seconds (``started`` is set as it
    begins) and, when ``fails``, then fails with a 500."""
    real_copy = storage._slow_client.copy_object
    copies: list[str] = []
    started = threading.Event()

    def copy_object(**kwargs: Any) -> Any:
        copies.append(kwargs["Key"])
        if len(copies) == 1:
            started.set()
            time.sleep(delay)
            if fails:
                raise _client_error(500, "InternalError")
        return real_copy(**kwargs)

    storage._slow_client.copy_object = copy_object  # type: ignore[method-assign]
    return copies, started


@pytest.mark.parametrize("fails", [False, True])
async def test_commits_of_one_content_at_once_share_one_refresh(
    s3_bucket: S3Bucket, fails: bool
) -> None:
    """Eight writers committing stored content at once: one copy onto itself, whose outcome
    (the kept bytes' sha256, or its failure) every one of them gets."""
    storage = s3_bucket.make_storage()
    data = mixed_data(300_000, seed=43)
    try:
        first = await write_blob(storage, data)
        copies, started = delayed_copies(storage, 2, fails)  # the others arrive meanwhile
        key = f"{S3_PREFIX}blobs/{first.blob_id[:2]}/{first.blob_id}"
        with ThreadPoolExecutor(8) as pool:
            first_call = pool.submit(storage._refresh_sync, key)
            started.wait(10)
            others = [pool.submit(storage._refresh_sync, key) for _ in range(7)]
            calls = [first_call, *others]
            if fails:
                for call in calls:
                    with pytest.raises(StorageUnavailable):
                        call.result(30)
            else:
                assert {call.result(30) for call in calls} == {
                    (first.stored_size, first.stored_sha256)
                }
        assert copies == [key]
        assert storage._refreshing == {}
    finally:
        await storage.close()


async def test_a_commit_does_not_wait_long_for_a_stuck_refresh(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3_module, "SHARED_REFRESH_WAIT", 1.0)
    storage = s3_bucket.make_storage()
    data = mixed_data(300_000, seed=44)
    try:
        first = await write_blob(storage, data)
        copies, started = delayed_copies(storage, 6)  # the first copy is stuck on a slow store
        key = f"{S3_PREFIX}blobs/{first.blob_id[:2]}/{first.blob_id}"
        with ThreadPoolExecutor(5) as pool:
            stuck = pool.submit(storage._refresh_sync, key)
            started.wait(10)
            began = time.monotonic()
            waiting = [pool.submit(storage._refresh_sync, key) for _ in range(3)]
            assert storage._refresh_sync(key) == (first.stored_size, first.stored_sha256)
            assert time.monotonic() - began < 4.5
            for call in [stuck, *waiting]:
                assert call.result(30) == (first.stored_size, first.stored_sha256)
        # The stuck one, then one new refresh each time the waiters give up (once, unless that
        # one too outlasts the wait on a loaded machine): never one for each waiter (5).
        assert 2 <= len(copies) <= 3
    finally:
        await storage.close()


async def test_a_store_refusing_writes_is_served_without_the_write_check(
    s3_bucket: S3Bucket, caplog: pytest.LogCaptureFixture
) -> None:
    """A read-only replica (its credentials may not write) still starts: the check is about
    stores that give other bytes back, not about permissions; storage that is down fails it."""
    storage = s3_bucket.make_storage()

    def refused(**kwargs: Any) -> Any:
        raise _client_error(403, "AccessDenied")

    try:
        storage._client.put_object = refused  # type: ignore[method-assign]
        await storage.check_writes()
        assert "writes not checked at start" in caplog.text
        assert await asyncio.to_thread(s3_bucket.keys, S3_PREFIX + "tmp/") == []

        def down(**kwargs: Any) -> Any:
            raise _client_error(503, "ServiceUnavailable")

        storage._client.put_object = down  # type: ignore[method-assign]
        with pytest.raises(StorageUnavailable):
            await storage.check_writes()

        def invalid(**kwargs: Any) -> Any:  # e.g. an object-lock bucket wanting Content-MD5
            raise _client_error(400, "InvalidRequest")

        storage._client.put_object = invalid  # type: ignore[method-assign]
        with pytest.raises(StorageError, match="InvalidRequest"):
            await storage.check_writes()
        assert "cannot delete temporary" not in caplog.text
    finally:
        await storage.close()


@pytest.mark.parametrize("size", [300_000, 11 * MiB])  # one PutObject, a multipart upload
async def test_content_stored_again_reports_the_kept_bytes_sha256_without_reading_them(
    s3_bucket: S3Bucket, size: int
) -> None:
    """The same NAR pushed to a second cache is committed again: the sha256 of the bytes kept
    comes from the blob's metadata, not from downloading the whole blob."""
    import hashlib

    storage = s3_bucket.make_storage(part_size=MIN_PART_SIZE)
    data = mixed_data(size, seed=21)
    downloads: list[str] = []

    def count(**kwargs: Any) -> None:
        downloads.append(kwargs["model"].name)

    storage._client.meta.events.register("before-call.s3.GetObject", count)
    try:
        first = await write_blob(storage, data, piece=MiB)
        again = await write_blob(storage, data, piece=3 * MiB)
        stored = await read_stored(storage, first.blob_id)
        assert first.stored_sha256 == again.stored_sha256 == hashlib.sha256(stored).digest()
        assert len(downloads) == 1  # the read_stored above, nothing for the commits
        head = s3_bucket.client.head_object(
            Bucket=s3_bucket.name, Key=f"{S3_PREFIX}blobs/{first.blob_id[:2]}/{first.blob_id}"
        )
        assert head["Metadata"] == {"sha256": hashlib.sha256(stored).hexdigest()}
    finally:
        await storage.close()


async def test_a_store_without_conditional_writes_still_takes_blobs_and_objects(
    s3_bucket: S3Bucket, caplog: pytest.LogCaptureFixture
) -> None:
    """S3 itself took ``If-None-Match`` only in 2024; a store that answers 501 to it gets a
    HEAD then a plain PUT instead, and a warning once."""
    storage = s3_bucket.make_storage()
    real_put = storage._client.put_object
    conditional: list[str] = []

    def put_object(**kwargs: Any) -> Any:
        if "IfNoneMatch" in kwargs:
            conditional.append(kwargs["Key"])
            raise ClientError(
                {"Error": {"Code": "NotImplemented", "Message": "If-None-Match"},
                 "ResponseMetadata": {"HTTPStatusCode": 501}},
                "PutObject",
            )  # fmt: skip
        return real_put(**kwargs)

    storage._client.put_object = put_object  # type: ignore[method-assign]
    try:
        data = mixed_data(200_000, seed=31)
        first = await write_blob(storage, data)
        again = await write_blob(storage, data)
        assert again.stored_size == first.stored_size
        assert decompress(await read_stored(storage, first.blob_id)) == data
        assert await storage.put_if_absent("config/token-secret", b"one")
        assert not await storage.put_if_absent("config/token-secret", b"two")
        assert await storage.get("config/token-secret") == b"one"
        # asked each time (a stray 501 costs one call), after the probe's one
        assert len(conditional) == 1 + 4
        assert conditional[0].startswith(S3_PREFIX + "tmp/")
        assert caplog.text.count("takes no conditional writes") == 1
    finally:
        await storage.close()


def record_conditional_puts(storage: S3Storage, *, honoured: bool) -> list[str]:
    """Record the key of each conditional ``PutObject``; a store that does not honour the
    condition is imitated by dropping it (the put then overwrites)."""
    real_put = storage._client.put_object
    conditional: list[str] = []

    def put_object(**kwargs: Any) -> Any:
        if "IfNoneMatch" in kwargs:
            conditional.append(kwargs["Key"])
            if not honoured:
                del kwargs["IfNoneMatch"]
        return real_put(**kwargs)

    storage._client.put_object = put_object  # type: ignore[method-assign]
    return conditional


async def test_a_store_that_ignores_conditional_writes_gets_a_head_then_a_put(
    s3_bucket: S3Bucket, caplog: pytest.LogCaptureFixture
) -> None:
    """Some S3-compatible stores (s3rver, older releases of others) take ``If-None-Match: *``
    and overwrite anyway: a second ``cache create`` would replace the cache's signing key. The
    first conditional write finds out (two conditional PUTs of a probe key under ``tmp/``), and
    every creation is then a HEAD then a PUT, with one warning."""
    storage = s3_bucket.make_storage()
    conditional = record_conditional_puts(storage, honoured=False)
    try:
        assert await storage.put_if_absent("config/token-secret", b"one")
        assert not await storage.put_if_absent("config/token-secret", b"two")
        assert await storage.get("config/token-secret") == b"one"
        data = mixed_data(200_000, seed=32)
        first = await write_blob(storage, data)
        assert await write_blob(storage, data) == first
        assert decompress(await read_stored(storage, first.blob_id)) == data
        assert len(conditional) == 2 and conditional[0] == conditional[1]  # the probe, once
        assert conditional[0].startswith(S3_PREFIX + "tmp/")
        assert await asyncio.to_thread(s3_bucket.keys, S3_PREFIX + "tmp/") == []
        assert caplog.text.count("ignores conditional writes") == 1
        assert "takes no conditional writes" not in caplog.text
    finally:
        await storage.close()


async def test_a_store_honouring_conditional_writes_is_probed_once(
    s3_bucket: S3Bucket, caplog: pytest.LogCaptureFixture
) -> None:
    storage = s3_bucket.make_storage()
    conditional = record_conditional_puts(storage, honoured=True)
    try:
        assert await storage.put_if_absent("a", b"one")
        assert not await storage.put_if_absent("a", b"two")
        assert await storage.put_if_absent("b", b"one")
        # the probe's two, then one each
        assert conditional[2:] == [f"{S3_PREFIX}objects/{key}" for key in ("a", "a", "b")]
        assert await asyncio.to_thread(s3_bucket.keys, S3_PREFIX + "tmp/") == []
        assert "conditional writes" not in caplog.text
    finally:
        await storage.close()


async def test_a_501_elsewhere_is_unavailable_storage(s3_bucket: S3Bucket) -> None:
    """Only a conditional put falls back on a 501; any other is a 503 as before."""
    storage = s3_bucket.make_storage()

    def get_object(**kwargs: Any) -> Any:
        raise ClientError(
            {"Error": {"Code": "NotImplemented"}, "ResponseMetadata": {"HTTPStatusCode": 501}},
            "GetObject",
        )

    storage._client.get_object = get_object  # type: ignore[method-assign]
    try:
        with pytest.raises(StorageUnavailable):
            await storage.get("caches/main/narinfo/x")
    finally:
        await storage.close()


@pytest.mark.parametrize("how", ["abort", "exception"])
async def test_multipart_abandoned(s3_bucket: S3Bucket, how: str) -> None:
    storage = s3_bucket.make_storage(part_size=MIN_PART_SIZE)
    data = os.urandom(11 * MiB)

    def work() -> None:
        writer = storage.blob_writer()
        with pytest.raises(RuntimeError) if how == "exception" else _nothing(), writer:
            writer.write(data)
            assert len(s3_bucket.uploads()) == 1
            if how == "exception":
                raise RuntimeError("client went away")
            writer.abort()

    try:
        await asyncio.to_thread(work)
        assert await asyncio.to_thread(s3_bucket.uploads) == []
        assert await asyncio.to_thread(s3_bucket.keys) == []
        assert await storage.blob_open(blob_id_of(data)) is None
    finally:
        await storage.close()


async def test_housekeeping_removes_what_a_failed_abort_left_once_stale(
    s3_bucket: S3Bucket,
) -> None:
    """An abort that failed in an outage leaves a multipart upload (and a completed one never
    copied, an object) under tmp/; housekeeping removes those whose upload started a day ago
    by both the time in their names and the store's listing (moto lists every upload as
    started in 2010; a writer's clock may be far behind), and never touches keys named
    otherwise: another application's (an MD5-named file), another store's under ``tmp/``."""
    import uuid

    storage = s3_bucket.make_storage()
    client, bucket = s3_bucket.client, s3_bucket.name
    tmp = f"{S3_PREFIX}tmp/"
    day_ago, now = int(time.time()) - 86400 - 60, int(time.time())

    def temp(started: int) -> str:
        return f"{tmp}{started}-{uuid.uuid4().hex}"

    old_upload, new_upload, other = temp(day_ago), temp(now), f"other/tmp/{day_ago}-{'e' * 32}"
    old_named_object, new_object = temp(day_ago), temp(now)
    foreign = [f"{tmp}reports/{day_ago}.csv", f"{tmp}objects/caches/main/narinfo/abc",
               f"{tmp}{'0123456789abcdef' * 2}"]  # fmt: skip
    try:
        for key in (old_upload, new_upload, other):
            client.create_multipart_upload(Bucket=bucket, Key=key)
        for key in [old_named_object, new_object, *foreign, f"{S3_PREFIX}objects/kept"]:
            client.put_object(Bucket=bucket, Key=key, Body=b"k")
        await storage.housekeep()
        assert sorted(s3_bucket.uploads()) == sorted([new_upload, other])
        # Named a day ago but listed just now (a writer's clock behind): kept.
        assert s3_bucket.keys(old_named_object) == [old_named_object]
        storage.STALE_UPLOAD = 0.0  # now everything of this store's is old enough
        await storage.housekeep()
        assert s3_bucket.uploads() == [other]
        assert sorted(s3_bucket.keys()) == sorted([*foreign, f"{S3_PREFIX}objects/kept"])
        await storage.housekeep()  # nothing left to do is no error
    finally:
        await storage.close()


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


async def test_part_size_bounds(s3_bucket: S3Bucket) -> None:
    with pytest.raises(ValueError):
        s3_bucket.make_storage(part_size=MIN_PART_SIZE - 1)
    with pytest.raises(ValueError):
        s3_bucket.make_storage(prefix="no-slash")
    with pytest.raises(ValueError):
        S3Storage("")


# -- layout --------------------------------------------------------------------------------


async def test_layout_and_prefix_isolation(s3_bucket: S3Bucket) -> None:
    storage = s3_bucket.make_storage()
    other = s3_bucket.make_storage(prefix="other/")
    try:
        info = await write_blob(storage, b"blob")
        await storage.put("caches/main/narinfo/x", b"narinfo")
        await other.put("caches/main/narinfo/y", b"elsewhere")
        s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="pfx/blobs/zz/junk", Body=b"")
        s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="pfx/objects/bad key", Body=b"")
        assert sorted(await asyncio.to_thread(s3_bucket.keys)) == sorted(
            [
                f"pfx/blobs/{info.blob_id[:2]}/{info.blob_id}",
                "pfx/blobs/zz/junk",
                "pfx/objects/bad key",
                "pfx/objects/caches/main/narinfo/x",
                "other/objects/caches/main/narinfo/y",
            ]
        )
        head = s3_bucket.client.head_object(
            Bucket=s3_bucket.name, Key=f"pfx/blobs/{info.blob_id[:2]}/{info.blob_id}"
        )
        assert head["ContentType"] == "application/zstd"
        assert [key async for key in storage.keys("")] == ["caches/main/narinfo/x"]
        assert [key async for key in other.keys("")] == ["caches/main/narinfo/y"]
        assert [blob async for blob in storage.blob_ids()] == [info.blob_id]
        assert [blob async for blob in other.blob_ids()] == []
        assert await other.get("caches/main/narinfo/x") is None
    finally:
        await storage.close()
        await other.close()


async def test_many_keys_are_paginated(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(S3Storage, "_LIST_PAGE_SIZE", 7)
    storage = s3_bucket.make_storage()
    try:
        names = [f"k/{i:03d}" for i in range(40)]  # several pages
        await asyncio.gather(*(storage.put(name, b"") for name in names))
        assert [key async for key in storage.keys("k/")] == names
        assert len([blob async for blob in storage.blob_ids()]) == 0
        blobs = await asyncio.gather(*(write_blob(storage, b"%d" % i) for i in range(20)))
        assert sorted([blob async for blob in storage.blob_ids()]) == sorted(
            info.blob_id for info in blobs
        )
    finally:
        await storage.close()


async def test_a_level_listing_reads_one_level_and_stops_at_the_limit(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(S3Storage, "_LIST_PAGE_SIZE", 5)
    storage = s3_bucket.make_storage()
    requests: list[dict[str, Any]] = []
    listed_keys: list[int] = []

    def seen(params: dict[str, Any], **_: Any) -> None:
        requests.append(params)

    def answered(parsed: dict[str, Any], **_: Any) -> None:
        listed_keys.append(len(parsed.get("Contents", [])) + len(parsed.get("CommonPrefixes", [])))

    storage._client.meta.events.register("provide-client-params.s3.ListObjectsV2", seen)
    storage._client.meta.events.register("after-call.s3.ListObjectsV2", answered)
    try:
        names = [f"top/d{i}/x/y/k{j:02d}" for i in range(4) for j in range(15)]  # 60 below
        names += [f"top/f{i}" for i in range(3)]
        await asyncio.gather(*(storage.put(name, b"") for name in names))

        listed = [item async for item in storage.list_level("top/", limit=100)]
        assert [(item.name, item.is_level) for item in listed] == [
            ("d0", True), ("d1", True), ("d2", True), ("d3", True),
            ("f0", False), ("f1", False), ("f2", False),
        ]  # fmt: skip
        # 7 names in pages of 5: two requests, never a key below the level
        assert len(requests) == 2 and sum(listed_keys) == 7
        assert {(r["Delimiter"], r["Prefix"]) for r in requests} == {("/", "pfx/objects/top/")}

        requests.clear()
        listed_keys.clear()
        assert len([item async for item in storage.list_level("top/", limit=3)]) == 3
        assert [r["MaxKeys"] for r in requests] == [3] and listed_keys == [3]

        requests.clear()
        assert len([key async for key in storage.keys("top/")]) == 63  # what keys() would read
        assert len(requests) == 13
    finally:
        await storage.close()


async def test_blob_deleted_while_open(s3_bucket: S3Bucket) -> None:
    storage = s3_bucket.make_storage()
    try:
        info = await write_blob(storage, b"going away")
        reader = await storage.blob_open(info.blob_id)
        assert reader is not None
        await storage.blob_delete(info.blob_id)
        with pytest.raises(StorageError, match="deleted"):
            [chunk async for chunk in reader.chunks()]
        await reader.close()
    finally:
        await storage.close()


async def test_open_storage_uses_aws_endpoint_url(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket.endpoint)
    storage = open_storage(f"s3://{s3_bucket.name}/team/cache")
    try:
        assert isinstance(storage, S3Storage)
        assert storage.prefix == "team/cache/"
        await storage.check()
        await storage.put("k", b"v")
        assert s3_bucket.client.get_object(Bucket=s3_bucket.name, Key="team/cache/objects/k")[
            "Body"
        ].read() == (b"v")
    finally:
        await storage.close()
        await storage.close()  # closing twice is harmless


@pytest.mark.parametrize(
    ("how", "checksummed"),
    [("endpoint_url", False), ("AWS_ENDPOINT_URL", False), ("AWS_ENDPOINT_URL_S3", False),
     ("chosen by the user", True)],
)  # fmt: skip
async def test_a_custom_endpoint_gets_checksums_only_where_required(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch, how: str, checksummed: bool
) -> None:
    """Over HTTPS botocore's default sends every upload as an aws-chunked body with a CRC32
    trailer, which some S3-compatible stores (s3rver) keep as the object's bytes: at a custom
    endpoint larder sends checksums only where S3 requires them, unless the user chose."""
    monkeypatch.delenv("AWS_REQUEST_CHECKSUM_CALCULATION")
    if how == "endpoint_url":
        storage = s3_bucket.make_storage(part_size=MIN_PART_SIZE)
    else:
        if how == "chosen by the user":
            monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_supported")
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3" if how.endswith("_S3") else "AWS_ENDPOINT_URL",
                           s3_bucket.endpoint)  # fmt: skip
        storage = S3Storage(s3_bucket.name, S3_PREFIX, part_size=MIN_PART_SIZE)
    sent: list[str] = []

    def headers(request: Any, **kwargs: Any) -> None:
        names = (name.lower() for name in request.headers)
        sent.extend(n for n in names if "checksum" in n and n != "x-amz-checksum-mode")  # reads

    for client in (storage._client, storage._slow_client):
        client.meta.events.register("before-send.s3", headers)
    try:
        await storage.put("k", b"v")
        data = os.urandom(6 * MiB)
        info = await write_blob(storage, data)  # a multipart upload and a copy
        assert decompress(await read_stored(storage, info.blob_id)) == data
        assert bool(sent) == checksummed, sent
    finally:
        await storage.close()


async def test_the_write_check_finds_a_store_that_keeps_the_chunk_framing(
    s3_bucket: S3Bucket,
) -> None:
    """What s3rver stores of an aws-chunked upload: the framing and the trailer around the
    bytes. ``check_writes`` (run once at start-up) says so, and how to avoid it."""
    storage = s3_bucket.make_storage()
    try:
        await storage.check_writes()  # a store that keeps the bytes passes
        real_put = storage._client.put_object

        def put_object(**kwargs: Any) -> Any:
            body = kwargs["Body"]
            framed = b"%x\r\n%s\r\n0\r\nx-amz-checksum-crc32:AAAAAA==\r\n\r\n" % (len(body), body)
            return real_put(**{**kwargs, "Body": framed})

        storage._client.put_object = put_object  # type: ignore[method-assign]
        with pytest.raises(StorageError) as caught:
            await storage.check_writes()
        assert not isinstance(caught.value, StorageUnavailable)  # stops the start, no retries
        message = caught.value.message
        assert "the store returned other bytes than were written" in message
        assert "AWS_REQUEST_CHECKSUM_CALCULATION=when_required" in message
        assert "\n" not in message
        assert await asyncio.to_thread(s3_bucket.keys) == []  # the probe is deleted
    finally:
        await storage.close()


async def test_missing_bucket_is_an_error_not_a_miss(s3_bucket: S3Bucket) -> None:
    storage = S3Storage("no-such-bucket-here", endpoint_url=s3_bucket.endpoint, max_attempts=1)
    try:
        with pytest.raises(StorageError, match="does not exist") as caught:
            await storage.check()
        assert not isinstance(caught.value, StorageUnavailable)
        with pytest.raises(StorageError, match="NoSuchBucket"):
            await storage.get("k")
        with pytest.raises(StorageError, match="NoSuchBucket"):
            await storage.put("k", b"v")
    finally:
        await storage.close()


# -- failures --------------------------------------------------------------------------------


async def every_operation_fails_with(storage: Storage, error: type[StorageError]) -> None:
    some_blob = blob_id_of(b"x")
    calls: list[Callable[[], Any]] = [
        lambda: storage.get("k"),
        lambda: storage.put("k", b"v"),
        lambda: storage.put_if_absent("k", b"v"),
        lambda: storage.exists("k"),
        lambda: storage.delete("k"),
        lambda: storage.check(),
        lambda: storage.blob_open(some_blob),
        lambda: storage.blob_stored_size(some_blob),
        lambda: storage.blob_delete(some_blob),
    ]
    for call in calls:
        with pytest.raises(error):
            await call()
    with pytest.raises(error):
        [key async for key in storage.keys("")]
    with pytest.raises(error):
        [blob async for blob in storage.blob_ids()]

    def small_blob() -> None:
        with storage.blob_writer() as writer:
            writer.write(b"small")
            with pytest.raises(error):
                writer.commit()

    def large_blob() -> None:
        with storage.blob_writer() as writer, pytest.raises(error):
            writer.write(os.urandom(6 * MiB))  # the first part is sent while writing

    await asyncio.to_thread(small_blob)
    await asyncio.to_thread(large_blob)


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("AWS_ENDPOINT_URL", "minio:9000", "AWS_ENDPOINT_URL"),
        ("AWS_DEFAULT_REGION", "eu_west 1", "AWS_DEFAULT_REGION"),
        ("AWS_PROFILE", "nosuch", "AWS_PROFILE"),
    ],
)
def test_a_bad_aws_setting_is_a_storage_error_naming_it(
    aws_env: None, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, named: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(StorageError, match="cannot set up the S3 client") as caught:
        S3Storage("bucket")
    assert named in caught.value.message and value in caught.value.message


async def test_unreachable_endpoint_is_unavailable(aws_env: None) -> None:
    storage = S3Storage(
        "bucket",
        endpoint_url="http://127.0.0.1:1",
        part_size=MIN_PART_SIZE,
        connect_timeout=1,
        read_timeout=1,
        max_attempts=1,
    )
    try:
        await every_operation_fails_with(storage, StorageUnavailable)
    finally:
        await storage.close()


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """Accepts connections and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


async def test_the_configured_timeout_and_pool_reach_the_client(aws_env: None) -> None:
    """``open_storage``'s timeout is each attempt's read timeout; a hung endpoint then costs
    about 3x it, and the pool has room for the blob writers' threads beside the workers'."""
    storage = open_storage("s3://bucket/p", timeout=7.5)
    assert isinstance(storage, S3Storage)
    try:
        config = storage._client.meta.config
        assert config.read_timeout == 7.5
        assert config.retries["total_max_attempts"] == 3  # the first attempt included
        assert config.max_pool_connections >= 16 + 8  # S3 workers + the service's writers
    finally:
        await storage.close()


async def test_read_timeout_is_unavailable(aws_env: None, silent_endpoint: str) -> None:
    storage = S3Storage("bucket", endpoint_url=silent_endpoint, read_timeout=0.3, max_attempts=1)
    try:
        with pytest.raises(StorageUnavailable):
            await storage.get("k")
        with pytest.raises(StorageUnavailable):
            await storage.check()
    finally:
        await storage.close()


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """An HTTP server on a free local port answering with ``handler``, in a thread; its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextmanager
def error_endpoint(status: int, code: str) -> Iterator[str]:
    """An HTTP server answering every request with ``status`` and an S3 error ``code``."""
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>'
        f"<Error><Code>{code}</Code><Message>injected</Message></Error>"
    ).encode()

    class Handler(BaseHTTPRequestHandler):
        def reply(self) -> None:
            self.close_connection = True
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = reply

        def log_message(self, format: str, *args: Any) -> None:
            return None

    with serving(Handler) as url:
        yield url


@contextmanager
def delaying_proxy(upstream: str, copy_delay: float) -> Iterator[str]:
    """A proxy before ``upstream`` that answers every copy (``x-amz-copy-source``) and multipart
    completion ``copy_delay`` seconds late, sending nothing meanwhile: a store slow to copy."""
    import http.client
    from urllib.parse import urlsplit

    target = urlsplit(upstream)
    hop = {"connection", "keep-alive", "transfer-encoding", "content-length"}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)

        def forward(self) -> None:
            body = self.body()
            slow = "x-amz-copy-source" in self.headers or (
                self.command == "POST" and "uploadId=" in self.path
            )
            if slow:
                time.sleep(copy_delay)
            conn = http.client.HTTPConnection(target.hostname or "", target.port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in hop}
            conn.request(self.command, self.path, body or None, headers)
            answer = conn.getresponse()
            data = answer.read()
            self.send_response(answer.status)
            for name, value in answer.getheaders():
                if name.lower() not in hop:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            conn.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = forward

        def log_message(self, format: str, *args: Any) -> None:
            return None

    with serving(Handler) as url:
        yield url


async def test_a_store_slow_to_copy_a_large_blob_still_commits_it(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A multipart blob's completion and copy may take a store longer than the usual timeout
    without a byte sent; retrying one only starts it over. They get their own timeout."""
    from larder.storage import s3

    monkeypatch.setattr(s3, "SLOW_CALL_TIMEOUT", 10.0)
    data = os.urandom(11 * MiB)
    with delaying_proxy(s3_bucket.endpoint, copy_delay=2.0) as endpoint:
        storage = S3Storage(
            s3_bucket.name, S3_PREFIX, endpoint_url=endpoint, part_size=MIN_PART_SIZE,
            read_timeout=1.0, max_attempts=1,
        )  # fmt: skip
        try:
            info = await write_blob(storage, data)
            direct = s3_bucket.make_storage()
            try:
                assert decompress(await read_stored(direct, info.blob_id)) == data
            finally:
                await direct.close()
            with pytest.raises(ReadTimeoutError):  # the usual calls keep the usual timeout
                await asyncio.to_thread(
                    storage._client.copy_object,
                    Bucket=s3_bucket.name,
                    Key=f"{S3_PREFIX}x",
                    CopySource={"Bucket": s3_bucket.name, "Key": f"{S3_PREFIX}x"},
                )
        finally:
            await storage.close()


@pytest.mark.parametrize(
    ("status", "code", "error"),
    [
        (503, "SlowDown", StorageUnavailable),
        (500, "InternalError", StorageUnavailable),
        (507, "XMinioStorageFull", StorageFull),
        (403, "QuotaExceeded", StorageFull),
    ],
)
async def test_server_errors_are_translated(
    aws_env: None, status: int, code: str, error: type[StorageError]
) -> None:
    with error_endpoint(status, code) as endpoint:
        storage = S3Storage("bucket", endpoint_url=endpoint, max_attempts=1)
        try:
            with pytest.raises(error):
                await storage.put("k", b"v")
            with pytest.raises(error):
                await storage.get("k")
            with pytest.raises(StorageError):
                await storage.exists("k")  # HEAD has no body: only the status is known
        finally:
            await storage.close()


def _client_error(status: int, code: str) -> ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": "m"},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, "PutObject")


@pytest.mark.parametrize(
    ("exc", "error"),
    [
        (_client_error(503, "SlowDown"), StorageUnavailable),
        (_client_error(400, "Throttling"), StorageUnavailable),
        (_client_error(429, "TooManyRequests"), StorageUnavailable),
        (_client_error(502, "BadGateway"), StorageUnavailable),
        (_client_error(400, "RequestTimeout"), StorageUnavailable),
        (_client_error(403, "QuotaExceeded"), StorageFull),
        (_client_error(507, "InsufficientStorage"), StorageFull),
        (_client_error(403, "AccessDenied"), StorageError),
        (_client_error(403, "InvalidAccessKeyId"), StorageError),
        (_client_error(400, "EntityTooLarge"), StorageError),
        (_client_error(404, "NoSuchBucket"), StorageError),
        (EndpointConnectionError(endpoint_url="http://x"), StorageUnavailable),
        (ReadTimeoutError(endpoint_url="http://x"), StorageUnavailable),
    ],
)
def test_translation_table(exc: Exception, error: type[StorageError]) -> None:
    with pytest.raises(StorageError) as caught, _translate_errors("test"):
        raise exc
    assert type(caught.value) is error
    assert caught.value.__cause__ is exc


def test_missing_is_private_and_still_a_storage_error() -> None:
    with pytest.raises(StorageError) as caught, _translate_errors("test"):
        raise _client_error(404, "NoSuchKey")
    assert type(caught.value).__name__ == "_Missing"


async def test_big_blob_under_part_size_is_one_put(s3_bucket: S3Bucket) -> None:
    storage = s3_bucket.make_storage(part_size=MIN_PART_SIZE)
    try:
        data = mixed_data(4 * MiB)
        info = await write_blob(storage, data)
        assert info.stored_size < MIN_PART_SIZE
        assert decompress(await read_stored(storage, info.blob_id)) == data
        assert await asyncio.to_thread(s3_bucket.uploads) == []
    finally:
        await storage.close()


async def test_lookups_go_on_while_every_body_reader_waits_on_the_store(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Downloads from a slow store (or to slow clients) hold their reading threads: small
    calls (a narinfo lookup) have threads of their own and do not queue behind them."""
    storage = s3_bucket.make_storage(max_workers=2)
    try:
        info = await write_blob(storage, mixed_data(600_000, seed=31))
        await storage.put("caches/main/narinfo/x", b"narinfo")
        stuck = threading.Event()
        real_read = s3_module._read_body

        def slow_read(body: Any, size: int) -> bytes:
            stuck.wait(30)
            return real_read(body, size)

        monkeypatch.setattr(s3_module, "_read_body", slow_read)
        readers = [await storage.blob_open(info.blob_id) for _ in range(4)]
        downloads = [
            asyncio.ensure_future(anext(reader.chunks()))  # type: ignore[union-attr]
            for reader in readers
        ]
        await asyncio.sleep(0.5)
        try:
            assert await asyncio.wait_for(storage.get("caches/main/narinfo/x"), 10) == b"narinfo"
        finally:
            stuck.set()
            await asyncio.gather(*downloads)
    finally:
        await storage.close()


@pytest.mark.parametrize("size", [300_000, 12 * MiB])  # one PUT; multipart, then a copy
async def test_content_committed_again_replaces_a_blob_overwritten_at_rest(
    s3_bucket: S3Bucket, size: int
) -> None:
    """A blob overwritten with other bytes: a commit of its content kept them, reported their
    size and sha256 for the records, and so made the damage look sound from then on."""
    storage = s3_bucket.make_storage(part_size=MIN_PART_SIZE)
    try:
        data = os.urandom(size)
        first = await write_blob(storage, data)
        key = f"{S3_PREFIX}blobs/{first.blob_id[:2]}/{first.blob_id}"
        await asyncio.to_thread(
            s3_bucket.client.put_object, Bucket=s3_bucket.name, Key=key, Body=b"garbage"
        )
        again = await write_blob(storage, data)
        stored = await read_stored(storage, first.blob_id)
        assert decompress(stored) == data
        assert again.stored_size == len(stored)
        assert again.stored_sha256 == hashlib.sha256(stored).digest()
    finally:
        await storage.close()


async def test_a_sound_blob_stored_by_another_writer_is_kept_and_hashed(
    s3_bucket: S3Bucket,
) -> None:
    """A blob without larder's recorded sha256 (another encoding of the content) stays; the
    commit reports the sha256 of its bytes."""
    storage = s3_bucket.make_storage()
    try:
        data = mixed_data(300_000, seed=41)
        first = await write_blob(storage, data)
        key = f"{S3_PREFIX}blobs/{first.blob_id[:2]}/{first.blob_id}"
        other = zstandard.ZstdCompressor(level=19).compress(data)
        await asyncio.to_thread(
            s3_bucket.client.put_object, Bucket=s3_bucket.name, Key=key, Body=other
        )
        again = await write_blob(storage, data)
        assert await read_stored(storage, first.blob_id) == other
        assert (again.stored_size, again.stored_sha256) == (
            len(other),
            hashlib.sha256(other).digest(),
        )
    finally:
        await storage.close()
