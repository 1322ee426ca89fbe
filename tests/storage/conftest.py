"""Fixtures for the storage contract suite: one ``backend`` fixture over memory, disk and S3.

S3 is a moto server in real HTTP mode (one per test process), reached through the same boto3
client construction that production uses; each test gets its own bucket.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from moto.s3.responses import S3Response
from moto.server import ThreadedMotoServer

from larder.storage.base import Storage
from larder.storage.disk import DiskStorage
from larder.storage.memory import MemoryStorage
from tests.storage.helpers import S3_PREFIX, Backend, S3Bucket

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

# -- S3 (moto) ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    with pytest.MonkeyPatch.context() as patch:
        # moto 5.2.5 checks If-None-Match and then stores the object without a lock, so two
        # racing conditional PUTs can both succeed (about one run in thirty); on S3 the check is
        # atomic. Serialising moto's PutObject handler models S3, so the race test exercises
        # larder's code rather than moto's.
        lock = threading.Lock()
        original = S3Response.put_object

        def put_object_atomically(self: S3Response) -> Any:
            with lock:
                return original(self)

        patch.setattr(S3Response, "put_object", put_object_atomically)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
        server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fake credentials, and nothing from the developer's own AWS configuration."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # moto stands in for AWS: talk to it as boto3 talks to AWS (a CRC32 with every upload), not
    # as larder talks to other custom endpoints (test_s3.py checks that default).
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_supported")


@pytest.fixture(scope="session")
def s3_admin(moto_endpoint: str) -> S3Client:
    """A plain client with fixed fake credentials, to set up and inspect buckets."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=moto_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture
def s3_bucket(moto_endpoint: str, s3_admin: S3Client, aws_env: None) -> S3Bucket:
    name = f"larder-test-{uuid.uuid4().hex[:16]}"
    s3_admin.create_bucket(Bucket=name)
    return S3Bucket(moto_endpoint, name, s3_admin)


# -- the contract fixture ----------------------------------------------------------------


async def _nothing() -> list[str]:
    return []


@pytest.fixture(params=["memory", "disk", pytest.param("s3", marks=pytest.mark.s3)])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "memory":
        result = Backend("memory", MemoryStorage(), _nothing)
    elif request.param == "disk":
        root = tmp_path / "store"
        disk = DiskStorage(root)

        async def disk_temporaries() -> list[str]:
            return sorted(path.name for path in (root / "tmp").iterdir())

        result = Backend("disk", disk, disk_temporaries)
    else:
        bucket: S3Bucket = request.getfixturevalue("s3_bucket")

        async def s3_temporaries() -> list[str]:
            def look() -> list[str]:
                return bucket.keys(S3_PREFIX + "tmp/") + bucket.uploads()

            return await asyncio.to_thread(look)

        result = Backend("s3", bucket.make_storage(), s3_temporaries)
    try:
        yield result
    finally:
        await result.storage.close()


@pytest.fixture
def storage(backend: Backend) -> Storage:
    return backend.storage
