"""Opening a store from its URL: the only place that chooses a backend.

* ``memory://``                  :class:`MemoryStorage` (tests; nothing persists)
* ``s3://BUCKET[/PREFIX]``       :class:`S3Storage`; credentials, region and endpoint
                                 (``AWS_ENDPOINT_URL``) come from boto3's usual sources
* ``file:///ABS/PATH``           :class:`DiskStorage` in that directory
* anything else                  a filesystem directory path for :class:`DiskStorage`
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from larder.storage.base import Storage, check_key
from larder.storage.blobformat import DEFAULT_ZSTD_LEVEL
from larder.storage.disk import DiskStorage
from larder.storage.memory import MemoryStorage

DEFAULT_TIMEOUT = 15.0

# S3 bucket naming rules (3-63 characters of lowercase letters, digits, dots and hyphens, starting
# and ending with a letter or digit); underscores are tolerated for S3-compatible stores.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]")


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix/")``; else ``ValueError``."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or parts.query or parts.fragment or "?" in url or "#" in url:
        raise ValueError(f"not an s3://BUCKET[/PREFIX] URL: {url!r}")
    bucket = parts.netloc
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ValueError(f"invalid S3 bucket name in {url!r}")
    prefix = parts.path.strip("/")
    if prefix:
        try:
            check_key(prefix)
        except ValueError:
            raise ValueError(f"invalid S3 key prefix in {url!r}") from None
        prefix += "/"
    return bucket, prefix


def _file_url_path(url: str) -> Path:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise ValueError(f"not a local file:///PATH URL: {url!r}")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise ValueError(f"not a local file:///PATH URL: {url!r}")
    return Path(path)


def check_storage_url(url: str) -> str:
    """``url`` if :func:`open_storage` can read it (without opening anything); else
    ``ValueError`` saying what is wrong."""
    if not url:
        raise ValueError("empty storage URL")
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme == "memory" and url.lower() != "memory://":
        raise ValueError(f"memory storage takes no path: {url!r}")
    if scheme == "s3":
        parse_s3_url(url)
    elif scheme == "file":
        _file_url_path(url)
    elif scheme not in ("", "memory"):
        raise ValueError(f"unknown storage URL scheme {scheme!r} in {url!r}")
    return url


def open_storage(
    url: str,
    *,
    zstd_level: int = DEFAULT_ZSTD_LEVEL,
    create: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
) -> Storage:
    """Open the store ``url`` names (see the module docstring). Raises ``ValueError`` if malformed.
    ``timeout``: seconds an S3 request waits for an answer's next bytes, per attempt.

    Disk stores create their directories on opening (with ``create=False`` a directory that does
    not exist is :class:`StorageUnavailable` instead); S3 stores do not contact the bucket until
    first used (call :meth:`Storage.check` to find out whether it answers).
    """
    check_storage_url(url)
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme == "memory":
        return MemoryStorage(zstd_level=zstd_level)
    if scheme == "s3":
        from larder.storage.s3 import S3Storage  # imports boto3: only when needed

        bucket, prefix = parse_s3_url(url)
        return S3Storage(bucket, prefix, zstd_level=zstd_level, read_timeout=timeout)
    if scheme == "file":
        return DiskStorage(_file_url_path(url), zstd_level, create=create)
    return DiskStorage(Path(url), zstd_level, create=create)
