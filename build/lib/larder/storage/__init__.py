"""Storage: one async interface (:mod:`.base`), one module per backend, one factory."""

from larder.storage.base import BlobInfo, BlobReader, BlobWriter, Storage
from larder.storage.factory import open_storage

__all__ = ["BlobInfo", "BlobReader", "BlobWriter", "Storage", "open_storage"]
