"""A store in an S3 (or S3-compatible) bucket, through boto3.

Layout under ``prefix`` in ``bucket``::

    <prefix>blobs/<id[:2]>/<id>     committed blobs: one zstd frame each
    <prefix>objects/<key>           objects
    <prefix>tmp/<time>-<uuid>       multipart uploads of blobs whose id is not known yet

A blob writer buffers compressed output. A blob that stays under ``part_size`` is sent with one
``PutObject`` to its final key at commit. A larger one goes to a multipart upload under ``tmp/``
whose parts are sent as they fill (at most about one part is buffered); commit completes it,
copies it server-side to the final key and deletes the temporary. Nothing appears under
``blobs/`` before commit. A blob already stored (identical content, perhaps encoded otherwise)
keeps its bytes, which the records made from it describe: the small commit is a conditional
``PutObject`` (``If-None-Match: *``), the large one looks first; the existing object is then
copied onto itself, which refreshes its ``LastModified`` (what garbage collection reads as the
blob's age; past 5 GiB, the limit of one copy, it is left as it is; on a store whose copy onto
itself keeps the date, through a copy under ``tmp/`` and back). Each blob carries the sha256
of its bytes as user metadata (``x-amz-meta-sha256``), so a commit that keeps an earlier one's
bytes reports their sha256 without reading them back. Two large commits of the
same content racing each other may leave either one's bytes. (In a versioned bucket each
refresh leaves a noncurrent version; expire those with a lifecycle rule.)

Modification times are ``LastModified`` (whole seconds, from S3's clock), read from the listing
for ``object_infos`` and ``blob_infos``. ``delete_if_older`` is a HEAD, a comparison and a
DELETE: a write landing between the HEAD and the DELETE (one round trip) is lost. Keep the
cutoff well in the past (a GC grace period) so that only writes racing an age decision made on
a long-untouched object can fall into that window.

Leftovers of a crash, or of an abort that failed in an outage, are a multipart upload or an
object under ``tmp/``: :meth:`S3Storage.housekeep` (after each garbage collection) removes them
once stale, as a bucket lifecycle rule (abort incomplete multipart uploads and expire ``tmp/``
after a day) would.

A level listing (``list_level``) is ``ListObjectsV2`` with ``/`` as delimiter (objects and
common prefixes of one level), a page at a time of at most what is still wanted, stopping at the
limit.

``put_if_absent`` is a conditional ``PutObject`` (``If-None-Match: *``), atomic on S3 itself. A
store that answers it 501, or takes it and overwrites anyway (found once per process by a probe
under ``tmp/``), gets a HEAD then a plain PUT instead, which writers racing for a new key can
both win.

Credentials, region and endpoint come from boto3's usual sources (``AWS_*`` variables including
``AWS_ENDPOINT_URL``, shared config files, instance roles); this module reads the environment
only to see whether a custom endpoint is configured: it then sends checksums only where S3
requires them, unless ``AWS_REQUEST_CHECKSUM_CALCULATION`` says otherwise
(:func:`_request_checksum_calculation`). A mistake there that boto3 finds while building the
client (an endpoint without a scheme, a malformed region, an unknown profile) is a
``StorageError`` naming the setting, which the ``larder`` command reports in one line. Async
methods run boto3 calls on the backend's own bounded thread pool; blob writers call boto3
directly from the (worker) thread driving them.

Every botocore exception is translated in one place, :func:`_translate_errors`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar, Literal, NamedTuple, TypeVar, cast

import boto3
import botocore.session
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    InvalidRegionError,
    NoCredentialsError,
    ProfileNotFound,
    ResponseStreamingError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from larder.errors import StorageError, StorageFull, StorageUnavailable
from larder.storage.base import (
    BlobInfo,
    BlobReader,
    BlobWriter,
    LevelEntry,
    ObjectInfo,
    Storage,
    StoredBlob,
    check_blob_id,
    check_directory,
    check_key,
    check_limit,
    check_prefix,
    is_valid_key,
    level_order,
)
from larder.storage.blobformat import (
    DEFAULT_ZSTD_LEVEL,
    READ_CHUNK,
    EncodingBlobWriter,
    check_stored,
    check_zstd_level,
    clamp_range,
)

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client
    from mypy_boto3_s3.paginator import ListObjectsV2Paginator
    from mypy_boto3_s3.type_defs import HeadObjectOutputTypeDef, ListObjectsV2OutputTypeDef

log = logging.getLogger(__name__)
T = TypeVar("T")

MIN_PART_SIZE = 5 * 1024 * 1024  # S3's minimum for every part but the last
MAX_PART_SIZE = 5 * 1024 * 1024 * 1024
MAX_COPY_OBJECT_SIZE = 5 * 1024 * 1024 * 1024  # larger objects need a multipart copy
BLOB_CONTENT_TYPE = "application/zstd"
OBJECT_CONTENT_TYPE = "application/octet-stream"


# -- the one place botocore exceptions are translated ------------------------------------


class _Missing(StorageError):
    """The object, upload or bucket does not exist (callers turn this into a return value)."""

    code = "storage_missing"


class _PreconditionFailed(StorageError):
    """A conditional request's condition did not hold (the object exists)."""


class _ConditionalConflict(StorageUnavailable):
    """Another conditional write to the same key was in flight; retrying is safe."""


class _NotImplemented(StorageUnavailable):
    """The store does not implement what was asked (``501``: ``If-None-Match`` on a store
    older than S3's conditional writes); unavailable to the callers that do not expect it."""


_MISSING_CODES = frozenset({"NoSuchKey", "NotFound", "404", "NoSuchUpload"})
_PRECONDITION_CODES = frozenset({"PreconditionFailed", "412"})
_FULL_CODES = frozenset({"QuotaExceeded", "XMinioStorageFull", "InsufficientStorage", "507"})
_UNAVAILABLE_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequests",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "ServiceUnavailable",
        "InternalError",
        "XMinioServerNotInitialized",
    }
)
_UNAVAILABLE_STATUSES = frozenset({408, 429})


def _client_error(operation: str, exc: ClientError) -> StorageError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    detail = f"S3 {operation} failed: {code or status}"
    if message := error.get("Message"):
        detail += f" ({message})"
    if code in _MISSING_CODES:
        return _Missing(detail)
    if code in _PRECONDITION_CODES or status == 412:
        return _PreconditionFailed(detail)
    if code == "ConditionalRequestConflict":
        return _ConditionalConflict(detail)
    if code == "NotImplemented" or status == 501:
        return _NotImplemented(detail)
    if code in _FULL_CODES or status == 507:
        return StorageFull(detail)
    if code in _UNAVAILABLE_CODES or status >= 500 or status in _UNAVAILABLE_STATUSES:
        return StorageUnavailable(detail)
    return StorageError(detail)


@contextmanager
def _translate_errors(operation: str) -> Iterator[None]:
    """Raise botocore's exceptions as storage errors.

    A missing key becomes the private ``_Missing``, a failed ``If-None-Match`` the private
    ``_PreconditionFailed``: the operations that treat them as values catch them.
    """
    try:
        yield
    except ClientError as exc:
        raise _client_error(operation, exc) from exc
    except (
        BotoConnectionError,  # EndpointConnectionError, ConnectTimeoutError, ProxyConnectionError
        HTTPClientError,  # ReadTimeoutError, ConnectionClosedError
        ResponseStreamingError,
        IncompleteReadError,
    ) as exc:
        raise StorageUnavailable(f"S3 {operation} failed: {exc}") from exc
    except NoCredentialsError as exc:
        raise StorageError(f"S3 {operation} failed: no AWS credentials configured") from exc
    except BotoCoreError as exc:
        raise StorageError(f"S3 {operation} failed: {exc}") from exc


def _client_setup_error(exc: Exception) -> StorageError:
    """A mistake in the AWS settings found while building the client, naming the setting."""
    if isinstance(exc, ProfileNotFound):
        hint = "AWS_PROFILE names a profile that no AWS config or credentials file defines"
    elif isinstance(exc, InvalidRegionError):
        hint = "check AWS_DEFAULT_REGION, AWS_REGION or region in the AWS config file"
    elif isinstance(exc, ValueError) and "endpoint" in str(exc).lower():
        hint = "AWS_ENDPOINT_URL needs a scheme and a host, e.g. http://minio:9000"
    else:
        hint = "check the AWS_* variables and the AWS config files"
    return StorageError(f"cannot set up the S3 client: {exc}; {hint}")


def _request_checksum_calculation(endpoint_url: str | None) -> Literal["when_required"] | None:
    """``request_checksum_calculation``: ``when_required`` for a store at a custom endpoint
    (``endpoint_url``, ``AWS_ENDPOINT_URL``, ``AWS_ENDPOINT_URL_S3``), unless the user chose
    (``AWS_REQUEST_CHECKSUM_CALCULATION``, or ``request_checksum_calculation`` in the AWS config
    file's profile, which boto3 then applies); ``None`` leaves botocore's choice.

    botocore's default, ``when_supported``, sends a CRC32 with every upload, over HTTPS as an
    ``aws-chunked`` body with a trailer; an S3-compatible store that does not decode that
    encoding (s3rver, older releases of others) keeps the chunk framing as the object's bytes.
    AWS itself keeps botocore's default.
    """
    custom = (
        endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    )
    if not custom or os.environ.get("AWS_REQUEST_CHECKSUM_CALCULATION"):
        return None
    try:
        profile = botocore.session.Session().get_scoped_config()
    except BotoCoreError:
        profile = {}  # an unknown profile: building the client says so
    if profile.get("request_checksum_calculation"):
        return None
    return "when_required"


#: The user metadata a blob's sha256 (of its bytes at rest) is recorded under.
_SHA256_METADATA = "sha256"


def _sha256_metadata(digest: bytes | None) -> dict[str, str]:
    return {_SHA256_METADATA: digest.hex()} if digest is not None else {}


def _recorded_sha256(metadata: dict[str, str]) -> bytes | None:
    """The sha256 recorded with a blob, if it is one."""
    try:
        digest = bytes.fromhex(metadata.get(_SHA256_METADATA, ""))
    except ValueError:
        return None
    return digest if len(digest) == 32 else None


# -- listings ----------------------------------------------------------------------------


class _Listed(NamedTuple):
    """One entry of a ``ListObjectsV2`` page."""

    name: str  # the full S3 key
    size: int
    modified: float  # LastModified as POSIX seconds


#: A blob writer's temporary under ``tmp/``: ``<unix seconds>-<uuid4 hex>`` (before, the uuid4
#: only; a uuid4 has version 4 and variant 8-b, which an MD5 or another hex name rarely has).
_TEMP_NAME = re.compile(r"(?:([0-9]{1,12})-)?[0-9a-f]{12}4[0-9a-f]{3}[89ab][0-9a-f]{15}")


def _temp_started(base: str, key: str, listed_at: float) -> float | None:
    """When the upload to temporary ``key`` (under ``base``) started, for judging it stale: the
    later of the time its name begins with (the writer's clock; some S3 imitations list every
    upload as started years ago) and the time the listing gave (the store's: a writer's clock
    far behind must not make a live upload look old). None for a key no blob writer names so."""
    name = key[len(base) :] if key.startswith(base) else ""
    match = _TEMP_NAME.fullmatch(name)
    if match is None:
        return None
    return max(float(match.group(1)), listed_at) if match.group(1) else listed_at


#: Seconds a commit waits for another's refresh of the same blob before it refreshes on its own
#: (a copy stuck on a slow store must not hold every later commit of that content).
SHARED_REFRESH_WAIT = 5.0

#: Seconds a blob's ``LastModified`` must lie before the store's clock for a self-copy that
#: keeps it to count as undated (both are in whole seconds; a blob that recent is fresh anyway).
UNDATED_COPY_MARGIN = 2.0


def _copy_undated(before: datetime, response: Any) -> bool:
    """Whether a ``CopyObject`` of an object onto itself left its ``LastModified``
    (``before``) although the store's clock (the answer's ``Date``) had moved on by
    :data:`UNDATED_COPY_MARGIN`; an answer without a ``LastModified`` tells nothing."""
    after = response.get("CopyObjectResult", {}).get("LastModified")
    if after is None or after > before:
        return False
    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    try:
        now = parsedate_to_datetime(date).timestamp() if date else time.time()
    except (TypeError, ValueError):
        now = time.time()
    return now - before.timestamp() >= UNDATED_COPY_MARGIN


def _timestamp(value: datetime | None) -> float:
    # S3 always sends LastModified; an imitation that does not makes the object look new.
    return value.timestamp() if value is not None else time.time()


# -- blobs -------------------------------------------------------------------------------


class _S3BlobWriter(EncodingBlobWriter):
    def __init__(self, storage: S3Storage, encoded: bool) -> None:
        super().__init__(level=storage._zstd_level, threads=storage._zstd_threads, encoded=encoded)
        self._storage = storage
        self._client = storage._client
        self._bucket = storage.bucket
        self._buffer = bytearray()
        # Named by when it started: some S3 imitations list every upload as started long ago.
        self._temp_key = f"{storage._prefix}tmp/{int(time.time())}-{uuid.uuid4().hex}"
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._temp_complete = False  # the multipart upload became an object under tmp/

    def _sink(self, piece: bytes) -> None:
        self._buffer += piece
        part_size = self._storage._part_size
        while len(self._buffer) >= part_size:
            self._upload_part(bytes(self._buffer[:part_size]))
            del self._buffer[:part_size]

    def _upload_part(self, data: bytes) -> None:
        if self._upload_id is None:
            with _translate_errors("multipart upload start"):
                response = self._client.create_multipart_upload(
                    Bucket=self._bucket,
                    Key=self._temp_key,
                    ContentType=BLOB_CONTENT_TYPE,
                    **self._storage._checksum_options(),
                )
            self._upload_id = response["UploadId"]
        number = len(self._parts) + 1
        with _translate_errors("multipart upload part"):
            response_part = self._client.upload_part(
                Bucket=self._bucket,
                Key=self._temp_key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=data,
            )
        part: dict[str, Any] = {"PartNumber": number, "ETag": response_part["ETag"]}
        for name in ("ChecksumCRC32", "ChecksumCRC32C", "ChecksumCRC64NVME", "ChecksumSHA1"):
            if value := response_part.get(name):
                part[name] = value
        self._parts.append(part)

    def _publish(self, info: BlobInfo) -> tuple[int, bytes | None]:
        final = self._storage._blob_key(info.blob_id)
        # Content already stored (perhaps encoded otherwise) keeps its bytes, which the records
        # and narinfos made from it describe, and is only made fresh (module docstring).
        metadata = _sha256_metadata(info.stored_sha256)
        if self._upload_id is None:
            data = bytes(self._buffer)
            self._buffer = bytearray()
            for _ in range(5):
                if self._storage._create_sync(final, data, BLOB_CONTENT_TYPE, metadata):
                    return info.stored_size, info.stored_sha256
                kept = self._storage._refresh_sync(final)
                if kept is not None:
                    checked = self._kept_unless_damaged(final, kept, info)
                    if checked is None:
                        with _translate_errors("put"):
                            self._storage._client.put_object(
                                Bucket=self._bucket,
                                Key=final,
                                Body=data,
                                ContentType=BLOB_CONTENT_TYPE,
                                Metadata=metadata,
                            )
                        return info.stored_size, info.stored_sha256
                    return checked
                # deleted (by garbage collection) since: put it again
            raise StorageUnavailable("S3 blob put failed: the blob kept vanishing meanwhile")
        if self._buffer:
            self._upload_part(bytes(self._buffer))
            self._buffer = bytearray()
        with _translate_errors("multipart upload complete"):
            self._storage._slow_client.complete_multipart_upload(
                Bucket=self._bucket,
                Key=self._temp_key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": self._parts},  # type: ignore[typeddict-item]
            )
        self._upload_id = None
        self._temp_complete = True
        kept = self._storage._refresh_sync(final)
        if kept is not None:
            kept = self._kept_unless_damaged(final, kept, info)
        if kept is None:  # a commit of the same content racing this one may still overwrite it
            self._storage._copy_sync(self._temp_key, final, info.stored_size, metadata)
        self._temp_complete = False
        self._storage._delete_quietly(self._temp_key)
        return kept if kept is not None else (info.stored_size, info.stored_sha256)

    def _kept_unless_damaged(
        self, final: str, kept: tuple[int, bytes | None], info: BlobInfo
    ) -> tuple[int, bytes | None] | None:
        """``kept`` (the stored blob's size and recorded sha256), or ``None`` when that blob, not
        written by larder as this writer would (no sha256 recorded, another size), does not
        decode to its content (damaged at rest, overwritten): the caller then puts this
        writer's bytes in its place, and the records made from this commit describe them."""
        size, sha256 = kept
        if sha256 is not None and size == info.stored_size:
            return kept
        sound = self._storage._sound_sync(final, info)
        if sound is not None:
            return size, sound
        log.warning("blob %s was damaged at rest: replaced", info.blob_id)
        return None

    def _discard(self) -> None:
        self._buffer = bytearray()
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is not None:
            try:
                with _translate_errors("multipart upload abort"):
                    self._client.abort_multipart_upload(
                        Bucket=self._bucket, Key=self._temp_key, UploadId=upload_id
                    )
            except _Missing:
                pass
            except StorageError as exc:
                log.warning("cannot abort multipart upload of %s: %s", self._temp_key, exc)
        if self._temp_complete:
            self._temp_complete = False
            self._storage._delete_quietly(self._temp_key)


class _S3BlobReader(BlobReader):
    local_path = None

    def __init__(self, storage: S3Storage, key: str, stored_size: int) -> None:
        self._storage = storage
        self._key = key
        self.stored_size = stored_size
        self._closed = False

    async def chunks(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        start, stop = clamp_range(start, end, self.stored_size)
        if start >= stop:
            return
        if self._closed:
            raise ValueError("blob reader is closed")
        storage = self._storage
        body = await storage._read(
            storage._get_range_sync, self._key, start, stop, self.stored_size
        )
        try:
            received = 0
            while True:
                data = await storage._read(_read_body, body, READ_CHUNK)
                if not data:
                    break
                received += len(data)
                yield data
            if received != stop - start:
                raise StorageError(f"S3 blob read failed: got {received} of {stop - start} bytes")
        finally:
            body.close()

    async def close(self) -> None:
        self._closed = True


def _read_body(body: Any, size: int) -> bytes:
    with _translate_errors("blob read"):
        data: bytes = body.read(size)
    return data


#: Pooled connections kept beyond the two pools of ``max_workers`` threads for blob writers run
#: on other threads.
WRITER_CONNECTIONS = 16
#: Seconds to wait for the answer to a multipart completion or a copy (a store may copy a large
#: blob without sending anything meanwhile; the calls before them have the usual timeout, so a
#: store that hangs altogether fails there first).
SLOW_CALL_TIMEOUT = 120.0

# -- the backend -------------------------------------------------------------------------


class S3Storage(Storage):
    """Blobs and objects in one S3 bucket under an optional key prefix (``""`` or ending in ``/``).

    ``client``: a ready boto3 S3 client (then ``endpoint_url``, ``region_name``, the timeouts
    and ``max_attempts`` are ignored, and :meth:`close` leaves the client open); by default one
    is built with standard retries, these timeouts and ``2 * max_workers`` (plus
    :data:`WRITER_CONNECTIONS`) pooled connections. ``read_timeout`` bounds each wait for an
    answer's next bytes, per attempt: a hung endpoint fails a call after about
    ``max_attempts * read_timeout`` seconds.
    ``part_size``: multipart threshold and part size, 5 MiB to 5 GiB; a writer buffers at most
    about one part. ``max_workers``: threads running the async methods' boto3 calls, and as
    many again reading blob bodies (a download reads its body a chunk at a time as its client
    takes it, for as long as a slow store or client makes that last: lookups must not queue
    behind downloads).
    """

    backend: ClassVar[str] = "s3"
    _LIST_PAGE_SIZE: ClassVar[int] = 1000  # S3's maximum
    #: Seconds after its upload started that a blob writer's temporary under ``tmp/`` (an
    #: unfinished multipart upload, or one completed and never copied) is a leftover: no live
    #: upload takes a day. (An object completed from a multipart upload may be dated by S3 from
    #: when the upload began, so a temporary's own date says nothing sooner.)
    STALE_UPLOAD: ClassVar[float] = 86400.0

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: S3Client | None = None,
        zstd_level: int = DEFAULT_ZSTD_LEVEL,
        zstd_threads: int = 0,
        part_size: int = 8 * 1024 * 1024,
        max_workers: int = 16,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 15.0,
        max_attempts: int = 3,
    ) -> None:
        if not bucket:
            raise ValueError("S3 bucket name is empty")
        if prefix and not prefix.endswith("/"):
            raise ValueError(f"S3 prefix must end with '/': {prefix!r}")
        if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
            raise ValueError(f"S3 part size must be in [5 MiB, 5 GiB]: {part_size}")
        if max_workers < 1:
            raise ValueError(f"max_workers must be positive: {max_workers}")
        if zstd_threads < 0:
            raise ValueError(f"zstd threads must be >= 0: {zstd_threads}")
        self.bucket = bucket
        self._prefix = prefix
        self._zstd_level = check_zstd_level(zstd_level)
        self._zstd_threads = zstd_threads
        self._part_size = part_size
        self._owns_client = client is None

        checksums = _request_checksum_calculation(endpoint_url) if client is None else None

        def make(timeout: float, attempts: int) -> S3Client:
            config = Config(
                retries={"mode": "standard", "total_max_attempts": attempts},  # the first too
                connect_timeout=connect_timeout,
                read_timeout=timeout,
                # The blob writers, driven from the caller's threads, call boto3 too.
                max_pool_connections=2 * max_workers + WRITER_CONNECTIONS,
                # Validate checksums only where larder asks for it (whole-object reads): S3 does
                # not return checksums for ranged reads, but some S3 imitations send the whole
                # object's, which botocore would then fail to match.
                response_checksum_validation="when_required",
                request_checksum_calculation=checksums,
            )
            try:
                return boto3.session.Session().client(
                    "s3", endpoint_url=endpoint_url, region_name=region_name, config=config
                )
            except (BotoCoreError, ValueError) as exc:
                raise _client_setup_error(exc) from exc

        self._client: S3Client = client or make(read_timeout, max_attempts)
        # For the calls a store may take minutes to answer without sending anything (completing a
        # multipart upload, copying a blob, which a retry only starts over): made on first use.
        self._make_slow_client: Callable[[], S3Client] | None = (
            None if client else functools.partial(make, max(read_timeout, SLOW_CALL_TIMEOUT), 2)
        )
        self._made_slow_client: S3Client | None = None
        self._slow_client_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers, thread_name_prefix="larder-s3")
        self._reader = ThreadPoolExecutor(max_workers, thread_name_prefix="larder-s3-read")
        self._warned_unconditional = False
        #: Whether the store honours ``If-None-Match: *``: ``None`` until the first conditional
        #: write probes it (:meth:`_conditional_honoured`); ``False`` for a store that ignores it.
        self._conditions_honoured: bool | None = None
        self._probe_lock = threading.Lock()
        #: Refreshes in flight by key (:meth:`_refresh_sync`).
        self._refreshing: dict[str, Future[tuple[int, bytes | None] | None]] = {}
        self._refresh_lock = threading.Lock()
        #: Whether a blob's copy onto itself leaves its ``LastModified`` (:meth:`_refresh_sync`).
        self._self_copy_undated = False

    def __repr__(self) -> str:
        return f"S3Storage(bucket={self.bucket!r}, prefix={self._prefix!r})"

    @property
    def _slow_client(self) -> S3Client:
        if self._make_slow_client is None:
            return self._client  # a given client serves every call
        with self._slow_client_lock:
            if self._made_slow_client is None:
                self._made_slow_client = self._make_slow_client()
            return self._made_slow_client

    @property
    def prefix(self) -> str:
        return self._prefix

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the threads that read blob bodies."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reader, functools.partial(fn, *args))

    # -- keys ----------------------------------------------------------------------------

    def _blob_key(self, blob_id: str) -> str:
        return f"{self._prefix}blobs/{blob_id[:2]}/{blob_id}"

    def _object_key(self, key: str) -> str:
        return f"{self._prefix}objects/{check_key(key)}"

    def _checksum_options(self) -> dict[str, Any]:
        """``ChecksumAlgorithm`` for multipart uploads and copies, as boto3's transfers set it.

        botocore adds a CRC32 to every part by default (``request_checksum_calculation`` is
        ``when_supported`` unless ``AWS_REQUEST_CHECKSUM_CALCULATION`` says otherwise), so the
        upload must declare that algorithm for CompleteMultipartUpload to accept the parts; a
        copy asks for a CRC32 of the whole new object.
        """
        config = self._client.meta.config
        if getattr(config, "request_checksum_calculation", None) == "when_supported":
            return {"ChecksumAlgorithm": "CRC32"}
        return {}

    # -- blocking helpers (run on the executor, or on a blob writer's thread) -------------

    def _head_object_sync(self, key: str) -> HeadObjectOutputTypeDef | None:
        """The object's ``HeadObject`` answer, or ``None`` if it does not exist."""
        try:
            with _translate_errors("head"):
                return self._client.head_object(Bucket=self.bucket, Key=key)
        except _Missing:
            return None

    def _head_sync(self, key: str) -> int | None:
        """The object's size, or ``None`` if it does not exist."""
        head = self._head_object_sync(key)
        return None if head is None else head["ContentLength"]

    def _delete_if_older_sync(self, key: str, cutoff: float) -> bool:
        """HEAD, compare ``LastModified`` with ``cutoff``, DELETE.

        Not atomic: a write landing in the round trip between the HEAD and the DELETE is lost
        (an ``If-Match`` on the ETag would not help: a rewrite of identical content keeps it).
        """
        head = self._head_object_sync(key)
        if head is None or not head["LastModified"].timestamp() < cutoff:
            return False
        with _translate_errors("delete"):
            self._client.delete_object(Bucket=self.bucket, Key=key)
        return True

    def _get_sync(self, key: str, checksum: bool = True) -> bytes | None:
        """The object's bytes, ``None`` if absent; ``checksum=False`` takes them as the store
        gives them, unchecked (to compare them with what was written)."""
        options: dict[str, Any] = {"ChecksumMode": "ENABLED"} if checksum else {}
        try:
            with _translate_errors("get"):
                response = self._client.get_object(Bucket=self.bucket, Key=key, **options)
                with response["Body"] as body:
                    return body.read()
        except _Missing:
            return None

    def _get_range_sync(self, key: str, start: int, stop: int, size: int) -> Any:
        if start == 0 and stop == size:
            options: dict[str, Any] = {"ChecksumMode": "ENABLED"}
        else:
            options = {"Range": f"bytes={start}-{stop - 1}"}
        try:
            with _translate_errors("blob read"):
                response = self._client.get_object(Bucket=self.bucket, Key=key, **options)
        except _Missing:
            raise StorageError("S3 blob read failed: the blob was deleted") from None
        return response["Body"]

    def _sound_sync(self, key: str, info: BlobInfo) -> bytes | None:
        """The sha256 of blob ``key``'s bytes if they decode to ``info``'s content
        (:func:`check_stored`), ``None`` if not or if it is gone."""
        try:
            with _translate_errors("blob check"):
                response = self._client.get_object(Bucket=self.bucket, Key=key)
                with response["Body"] as body:
                    return check_stored(cast(BinaryIO, body), info.blob_id, info.size)
        except _Missing:
            return None

    def _put_sync(self, key: str, data: bytes) -> None:
        with _translate_errors("put"):
            self._client.put_object(
                Bucket=self.bucket, Key=key, Body=data, ContentType=OBJECT_CONTENT_TYPE
            )

    def _create_sync(
        self, key: str, data: bytes, content_type: str, metadata: dict[str, str] | None = None
    ) -> bool:
        """A conditional ``PutObject`` (``If-None-Match: *``): whether it created ``key``.

        A ``501`` to it (a store without conditional writes) is followed, for this call, by a
        HEAD then a plain PUT: two writers racing for a new key may then both think they
        created it. Each call asks the condition first, so a stray 501 costs one call's
        atomicity, not the process's. A store that takes the condition and ignores it (found
        once per process by :meth:`_conditional_honoured`) gets the HEAD and the PUT every time.
        """
        # Note: if botocore retries a put whose first attempt did succeed, the retry's 412
        # reports False although this call created the object. Callers read the object back.
        put = functools.partial(
            self._client.put_object,
            Bucket=self.bucket,
            Key=key,
            Body=data,
            ContentType=content_type,
            Metadata=metadata or {},
        )
        if not self._conditional_honoured():
            if self._head_sync(key) is not None:
                return False
            with _translate_errors("put"):
                put()
            return True
        for attempt in range(5):
            try:
                with _translate_errors("put"):
                    put(IfNoneMatch="*")
                return True
            except _PreconditionFailed:
                return False
            except _ConditionalConflict:
                time.sleep(0.05 * 2**attempt)
            except _NotImplemented as exc:
                if not self._warned_unconditional:
                    self._warned_unconditional = True
                    log.warning(
                        "%s takes no conditional writes (%s): creating objects with a HEAD "
                        "then a PUT, which two replicas creating the same new key can race",
                        self,
                        exc.message,
                    )
                if self._head_sync(key) is not None:
                    return False
                with _translate_errors("put"):
                    put()
                return True
        raise StorageUnavailable("S3 put failed: conditional writes keep conflicting")

    def _temp_key(self) -> str:
        """A new key under ``tmp/``, named as blob writers name theirs, so that
        :meth:`housekeep` removes it once stale if it is left behind."""
        return f"{self._prefix}tmp/{int(time.time())}-{uuid.uuid4().hex}"

    def _conditional_honoured(self) -> bool:
        """Whether the store honours ``If-None-Match: *``, asked once per process before the
        first conditional write: two conditional PUTs of a new key under ``tmp/``, of which
        the second must fail. Some S3-compatible stores (s3rver, older releases of others) take
        the header and ignore it, so that every creation would overwrite: those get a HEAD then
        a PUT instead, with one warning. A store that answers 501 counts as honouring it (each
        call then falls back by itself, :meth:`_create_sync`). A failure to ask is raised, and
        the next conditional write asks again."""
        if self._conditions_honoured is not None:
            return self._conditions_honoured
        with self._probe_lock:
            if self._conditions_honoured is None:
                self._conditions_honoured = self._probe_conditions()
            return self._conditions_honoured

    def _probe_conditions(self) -> bool:
        key = self._temp_key()
        created = False
        try:
            for _ in range(2):
                try:
                    with _translate_errors("put"):
                        self._client.put_object(
                            Bucket=self.bucket,
                            Key=key,
                            Body=b"larder: does this store honour If-None-Match?",
                            ContentType=OBJECT_CONTENT_TYPE,
                            IfNoneMatch="*",
                        )
                except (_PreconditionFailed, _NotImplemented, _ConditionalConflict):
                    return True
                created = True
        finally:
            if created:
                self._delete_quietly(key)
        self._warned_unconditional = True
        log.warning(
            "%s ignores conditional writes (If-None-Match: * overwrote an existing object): "
            "creating objects with a HEAD then a PUT, which two replicas creating the same new "
            "key (the collector's lease, a new cache) at the same moment can race",
            self,
        )
        return False

    def _check_writes_sync(self) -> None:
        key = self._temp_key()
        written = b"larder write check " + uuid.uuid4().hex.encode()
        with _translate_errors("put"):
            try:
                self._client.put_object(
                    Bucket=self.bucket, Key=key, Body=written, ContentType=OBJECT_CONTENT_TYPE
                )
            except ClientError as exc:
                error = exc.response.get("Error", {})
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if error.get("Code") != "AccessDenied" and status != 403:
                    raise
                # Credentials that may not write (a read-only replica): nothing to check.
                log.warning("%s: writes not checked at start, writing is denied: %s", self, exc)
                return
        try:
            read = self._get_sync(key, checksum=False)
        finally:
            self._delete_quietly(key)
        if read != written:
            got = "nothing" if read is None else f"{len(read)} bytes starting {read[:48]!r}"
            raise StorageError(
                f"the store returned other bytes than were written: {len(written)} bytes put to "
                f"{self.bucket}/{key}, {got} read back (a store that keeps the aws-chunked "
                f"framing of checksummed uploads: set AWS_REQUEST_CHECKSUM_CALCULATION="
                f"when_required)"
            )

    def _delete_sync(self, key: str) -> bool:
        if self._head_sync(key) is None:
            return False
        with _translate_errors("delete"):
            self._client.delete_object(Bucket=self.bucket, Key=key)
        return True

    def _delete_quietly(self, key: str) -> None:
        try:
            with _translate_errors("delete temporary"):
                self._client.delete_object(Bucket=self.bucket, Key=key)
        except StorageError as exc:
            log.warning("cannot delete temporary %s: %s", key, exc)

    def _refresh_sync(self, key: str) -> tuple[int, bytes | None] | None:
        """Make a stored blob's ``LastModified`` now, keeping its bytes and metadata; its size
        and the sha256 recorded with it (``None`` for blobs stored without one), or ``None`` if
        it is not there. A blob too large for one ``CopyObject`` is left as it is.

        Commits of one content that arrive together share one refresh: a later one waits for
        the refresh in flight and takes its outcome (eight copies of one object onto itself at
        once are eight times the work, and more than some stores take: moto fails them), for
        at most :data:`SHARED_REFRESH_WAIT` seconds: then the first to give up refreshes on
        its own, and the others wait for that one."""
        with self._refresh_lock:
            found = self._refreshing.get(key)
            mine = found is None
            pending = self._refreshing[key] = Future() if found is None else found
        while not mine:
            try:
                return pending.result(timeout=SHARED_REFRESH_WAIT)
            except FutureTimeout:  # stuck: the first waiter takes over, later ones share it
                with self._refresh_lock:
                    current = self._refreshing.get(key)
                    mine = current is pending or current is None
                    if mine or current is None:
                        pending = self._refreshing[key] = Future()
                    else:
                        pending = current
        try:
            result = self._refresh_once(key)
        except BaseException as exc:
            pending.set_exception(exc)
            raise
        else:
            pending.set_result(result)
            return result
        finally:
            with self._refresh_lock:
                if self._refreshing.get(key) is pending:
                    del self._refreshing[key]

    def _refresh_once(self, key: str) -> tuple[int, bytes | None] | None:
        head = self._head_object_sync(key)
        if head is None:
            return None
        size, metadata = head["ContentLength"], head.get("Metadata", {})
        if size > MAX_COPY_OBJECT_SIZE:
            return size, _recorded_sha256(metadata)
        try:
            if self._self_copy_undated:
                self._refresh_through_temp(key, size, metadata)
            else:
                with _translate_errors("blob refresh"):
                    response = self._slow_client.copy_object(
                        Bucket=self.bucket,
                        Key=key,
                        CopySource={"Bucket": self.bucket, "Key": key},
                        MetadataDirective="REPLACE",  # a copy onto itself must change something
                        Metadata=metadata,
                        ContentType=BLOB_CONTENT_TYPE,
                        **self._checksum_options(),
                    )
                if _copy_undated(head["LastModified"], response):
                    if not self._self_copy_undated:
                        self._self_copy_undated = True
                        log.warning(
                            "%s does not date an object copied onto itself: refreshing blobs "
                            "committed again by a copy through tmp/ and back",
                            self,
                        )
                    self._refresh_through_temp(key, size, metadata)
        except _Missing:
            return None
        return size, _recorded_sha256(metadata)

    def _refresh_through_temp(self, key: str, size: int, metadata: dict[str, str]) -> None:
        """Make ``key``'s ``LastModified`` now on a store that does not date self-copies: copy
        it to a new key under ``tmp/`` and back (a new object there is dated by every store)."""
        temp = self._temp_key()
        try:
            self._copy_sync(key, temp, size, metadata)
            self._copy_sync(temp, key, size, metadata)
        finally:
            self._delete_quietly(temp)

    def _copy_sync(
        self, source: str, target: str, size: int, metadata: dict[str, str] | None = None
    ) -> None:
        copy_source = {"Bucket": self.bucket, "Key": source}
        described: dict[str, Any] = {}
        if metadata:
            described = {"MetadataDirective": "REPLACE", "Metadata": metadata}
            described["ContentType"] = BLOB_CONTENT_TYPE
        with _translate_errors("blob copy"):
            if size <= MAX_COPY_OBJECT_SIZE:
                self._slow_client.copy_object(
                    Bucket=self.bucket,
                    Key=target,
                    CopySource=copy_source,  # type: ignore[arg-type]
                    **described,
                    **self._checksum_options(),
                )
            else:
                self._slow_client.copy(
                    copy_source,  # type: ignore[arg-type]
                    self.bucket,
                    target,
                    ExtraArgs=described or None,
                    Config=TransferConfig(
                        multipart_chunksize=max(self._part_size, 64 * 1024 * 1024),
                        max_concurrency=4,
                    ),
                )

    def _next_page(self, pages: Iterator[ListObjectsV2OutputTypeDef]) -> list[_Listed] | None:
        with _translate_errors("list"):
            page = next(pages, None)
        if page is None:
            return None
        return [
            _Listed(item["Key"], item.get("Size", 0), _timestamp(item.get("LastModified")))
            for item in page.get("Contents", [])
            if "Key" in item
        ]

    async def _list_items(self, prefix: str) -> AsyncIterator[_Listed]:
        paginator: ListObjectsV2Paginator = self._client.get_paginator("list_objects_v2")
        pages = iter(
            paginator.paginate(
                Bucket=self.bucket,
                Prefix=prefix,
                PaginationConfig={"PageSize": self._LIST_PAGE_SIZE},
            )
        )
        while (items := await self._run(self._next_page, pages)) is not None:
            for item in items:
                yield item

    def _level_page(
        self, prefix: str, token: str | None, max_keys: int
    ) -> tuple[list[LevelEntry], str | None]:
        """One ``ListObjectsV2`` page of ``prefix``'s level (``/`` as delimiter) and the token
        of the next page, ``None`` after the last."""
        base = self._prefix + "objects/"
        options: dict[str, Any] = {
            "Bucket": self.bucket,
            "Prefix": base + prefix,
            "Delimiter": "/",
            "MaxKeys": max_keys,
        }
        if token is not None:
            options["ContinuationToken"] = token
        with _translate_errors("list"):
            page = self._client.list_objects_v2(**options)
        entries = []
        for item in page.get("Contents", []):
            key = item.get("Key", "")[len(base) :]
            if key.startswith(prefix) and is_valid_key(key):
                info = ObjectInfo(key, item.get("Size", 0), _timestamp(item.get("LastModified")))
                entries.append(LevelEntry(key[len(prefix) :], info))
        for common in page.get("CommonPrefixes", []):
            level = common.get("Prefix", "")[len(base) :]
            if level.startswith(prefix) and level.endswith("/") and is_valid_key(level[:-1]):
                entries.append(LevelEntry(level[len(prefix) : -1], None))
        entries.sort(key=lambda entry: level_order(prefix, entry))
        more = page.get("IsTruncated") and page.get("NextContinuationToken")
        return entries, more or None

    async def _list_blobs(self) -> AsyncIterator[tuple[str, _Listed]]:
        """``(blob_id, listing)`` of every committed blob."""
        base = self._prefix + "blobs/"
        async for item in self._list_items(base):
            directory, _, blob_id = item.name[len(base) :].partition("/")
            if directory == blob_id[:2] and len(blob_id) == 64:
                try:
                    yield check_blob_id(blob_id), item
                except ValueError:
                    continue

    async def _list_objects(self, prefix: str) -> AsyncIterator[tuple[str, _Listed]]:
        """``(key, listing)`` of every object whose key starts with ``prefix``, in key order."""
        base = self._prefix + "objects/"
        async for item in self._list_items(base + check_prefix(prefix)):
            key = item.name[len(base) :]
            if is_valid_key(key):
                yield key, item

    # -- blobs ---------------------------------------------------------------------------

    def blob_writer(self, *, encoded: bool = False) -> BlobWriter:
        return _S3BlobWriter(self, encoded)

    async def blob_open(self, blob_id: str) -> BlobReader | None:
        key = self._blob_key(check_blob_id(blob_id))
        size = await self._run(self._head_sync, key)
        return _S3BlobReader(self, key, size) if size is not None else None

    async def blob_stored_size(self, blob_id: str) -> int | None:
        return await self._run(self._head_sync, self._blob_key(check_blob_id(blob_id)))

    async def blob_delete(self, blob_id: str) -> bool:
        return await self._run(self._delete_sync, self._blob_key(check_blob_id(blob_id)))

    async def blob_ids(self) -> AsyncIterator[str]:
        async for blob_id, _item in self._list_blobs():
            yield blob_id

    async def blob_infos(self) -> AsyncIterator[StoredBlob]:
        async for blob_id, item in self._list_blobs():
            yield StoredBlob(blob_id, item.size, item.modified)

    async def blob_delete_if_older(self, blob_id: str, cutoff: float) -> bool:
        key = self._blob_key(check_blob_id(blob_id))
        return await self._run(self._delete_if_older_sync, key, cutoff)

    # -- objects -------------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        return await self._run(self._get_sync, self._object_key(key))

    async def put(self, key: str, data: bytes) -> None:
        await self._run(self._put_sync, self._object_key(key), bytes(data))

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        create = functools.partial(self._create_sync, content_type=OBJECT_CONTENT_TYPE)
        return await self._run(create, self._object_key(key), bytes(data))

    async def exists(self, key: str) -> bool:
        return await self._run(self._head_sync, self._object_key(key)) is not None

    async def delete(self, key: str) -> bool:
        return await self._run(self._delete_sync, self._object_key(key))

    async def keys(self, prefix: str) -> AsyncIterator[str]:
        async for key, _item in self._list_objects(prefix):
            yield key

    async def object_infos(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        async for key, item in self._list_objects(prefix):
            yield ObjectInfo(key, item.size, item.modified)

    async def list_level(self, prefix: str, *, limit: int) -> AsyncIterator[LevelEntry]:
        check_directory(prefix)
        remaining = check_limit(limit)
        token: str | None = None
        while remaining > 0:
            page_size = min(remaining, self._LIST_PAGE_SIZE)
            entries, token = await self._run(self._level_page, prefix, token, page_size)
            for entry in entries[:remaining]:
                yield entry
            remaining -= len(entries)
            if token is None:
                break

    async def delete_if_older(self, key: str, cutoff: float) -> bool:
        return await self._run(self._delete_if_older_sync, self._object_key(key), cutoff)

    # -- lifecycle -----------------------------------------------------------------------

    def _check_sync(self) -> None:
        try:
            with _translate_errors("check"):
                self._client.head_bucket(Bucket=self.bucket)
        except _Missing:
            raise StorageError(f"S3 bucket {self.bucket!r} does not exist") from None

    async def check(self) -> None:
        await self._run(self._check_sync)

    async def check_writes(self) -> None:
        await self._run(self._check_writes_sync)

    async def housekeep(self) -> None:
        """Remove what blob writers that crashed, or could not clean up in an outage, left under
        ``tmp/``: multipart uploads and objects named as they name them whose upload started
        more than :attr:`STALE_UPLOAD` ago (a lifecycle rule does the same, where a store has
        one); keys named otherwise are not this store's and stay. Uploads that cannot be listed
        (no ``s3:ListBucketMultipartUploads``) are left to such a rule, with a warning."""
        try:
            uploads = await self._run(self._abort_stale_uploads)
        except StorageError as exc:
            log.warning("unfinished multipart uploads not swept: %s", exc.message)
            uploads = 0
        stale = [item.name async for item in self._list_items(self._prefix + "tmp/")
                 if self._stale(item.name, item.modified)]  # fmt: skip
        for key in stale:
            await self._run(self._delete_quietly, key)
        if uploads or stale:
            log.info(
                "removed %d unfinished multipart uploads and %d temporaries under %stmp/",
                uploads,
                len(stale),
                self._prefix,
            )

    def _stale(self, key: str, listed_at: float) -> bool:
        """Whether ``key`` is a blob writer's temporary whose upload started
        :attr:`STALE_UPLOAD` or more ago (:func:`_temp_started`)."""
        started = _temp_started(self._prefix + "tmp/", key, listed_at)
        return started is not None and time.time() - started >= self.STALE_UPLOAD

    def _abort_stale_uploads(self) -> int:
        with _translate_errors("list multipart uploads"):
            pages = self._client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self._prefix + "tmp/"
            )
            stale = [
                (upload["Key"], upload["UploadId"])
                for page in pages
                for upload in page.get("Uploads", [])
                if "Key" in upload and "UploadId" in upload
                and self._stale(upload["Key"], _timestamp(upload.get("Initiated")))
            ]  # fmt: skip
        aborted = 0
        for key, upload_id in stale:
            try:
                with _translate_errors("multipart upload abort"):
                    self._client.abort_multipart_upload(
                        Bucket=self.bucket, Key=key, UploadId=upload_id
                    )
                aborted += 1
            except _Missing:
                pass
        return aborted

    async def close(self) -> None:
        for executor in (self._executor, self._reader):
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
        if self._owns_client:
            self._client.close()
            if self._made_slow_client is not None:
                self._made_slow_client.close()
