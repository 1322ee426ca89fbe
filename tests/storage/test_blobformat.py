"""The blob encoder: BLAKE3 of the input, one zstd frame of it, whatever the write sizes."""

from __future__ import annotations

import hashlib
import io

import blake3
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from larder.storage.blobformat import WRITE_SLICE, BlobEncoder, check_stored, clamp_range


def encode(pieces: list[bytes], **options: int) -> tuple[str, bytes, list[int], BlobEncoder]:
    out: list[bytes] = []
    encoder = BlobEncoder(out.append, **options)
    for piece in pieces:
        encoder.write(piece)
    blob_id = encoder.finish()
    return blob_id, b"".join(out), [len(piece) for piece in out], encoder


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=5000), max_size=20), st.sampled_from([-5, 1, 3, 19]))
def test_any_split_gives_the_same_blob(pieces: list[bytes], level: int) -> None:
    data = b"".join(pieces)
    blob_id, stored, _, encoder = encode(pieces, level=level)
    assert blob_id == blake3.blake3(data).hexdigest()
    assert encoder.size == len(data)
    assert encoder.stored_size == len(stored)
    assert zstandard.ZstdDecompressor().decompressobj().decompress(stored) == data
    # the same bytes in one write make the same frame
    assert encode([data], level=level)[1] == stored


def test_large_writes_are_sliced() -> None:
    data = bytes(range(256)) * (16 * WRITE_SLICE // 256)
    blob_id, stored, sizes, _ = encode([data])
    assert blob_id == blake3.blake3(data).hexdigest()
    assert len(stored) < len(data) // 100
    incompressible = blake3.blake3(b"seed").digest(length=8 * WRITE_SLICE)
    _, stored, sizes, _ = encode([incompressible])
    assert len(sizes) > 1
    assert max(sizes) <= WRITE_SLICE + 64 * 1024
    assert zstandard.ZstdDecompressor().decompressobj().decompress(stored) == incompressible


def test_multithreaded_compression_is_one_valid_frame() -> None:
    data = blake3.blake3(b"mt").digest(length=3 * WRITE_SLICE) * 3
    blob_id, stored, _, _ = encode([data], threads=2)
    assert blob_id == blake3.blake3(data).hexdigest()
    assert zstandard.ZstdDecompressor().decompressobj().decompress(stored) == data


def test_bad_options() -> None:
    with pytest.raises(ValueError):
        BlobEncoder(lambda piece: None, level=23)
    with pytest.raises(ValueError):
        BlobEncoder(lambda piece: None, threads=-1)


def test_clamp_range() -> None:
    assert clamp_range(0, None, 10) == (0, 10)
    assert clamp_range(3, 5, 10) == (3, 5)
    assert clamp_range(3, 50, 10) == (3, 10)
    assert clamp_range(20, None, 10) == (10, 10)
    assert clamp_range(4, 4, 10) == (4, 4)
    with pytest.raises(ValueError):
        clamp_range(-1, None, 10)
    with pytest.raises(ValueError):
        clamp_range(5, 4, 10)


@pytest.mark.parametrize(
    ("damage", "sound"),
    [
        ("none", True),
        ("cut", False),
        ("flipped checksum", False),
        ("not zstd", False),
        ("another size", False),
    ],
)
def test_check_stored_knows_a_sound_blob_from_a_damaged_one(damage: str, sound: bool) -> None:
    data = b"fn main() {}\n" * 40_000
    _, stored, _, _ = encode([data])
    size = len(data)
    if damage == "cut":
        stored = stored[:-30]
    elif damage == "flipped checksum":
        stored = stored[:-1] + bytes([stored[-1] ^ 1])
    elif damage == "not zstd":
        stored = b"plain text, not a stored blob" * 100
    elif damage == "another size":
        size -= 1
    found = check_stored(io.BytesIO(stored), blake3.blake3(data).hexdigest(), size)
    assert found == (hashlib.sha256(stored).digest() if sound else None)
