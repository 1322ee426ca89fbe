"""``verify``: blobs and records damaged at rest are found, and repair makes them missing so the
next upload stores them again; a sound store, and everything sound in a damaged one, is left
alone."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import blake3
import pytest
import zstandard

from larder.core import keys
from larder.core.verify import verify
from larder.errors import StorageError, StorageUnavailable
from larder.protocol.inputs import Identity, InputsDocument
from larder.protocol.rustc import Manifest, Output
from larder.storage.base import BlobReader, ObjectInfo, StoredBlob
from larder.storage.memory import _Entry
from tests.core.gcworld import ClockedWorld as World
from tests.core.gcworld import body, hash_part, make_world, payload


@pytest.fixture
async def world() -> AsyncIterator[World]:
    made = await make_world()
    yield made
    made.executor.shutdown()


async def nar_blob(world: World, path: str) -> str:
    info = await world.narinfo(path)
    assert info is not None
    record = await world.nix.nar_record(world.main, info.nar_hash.nix32())
    assert record is not None
    return record.blob_id


def overwrite(world: World, blob_id: str, content: bytes) -> None:
    """The blob now decodes, without complaint, to ``content``."""
    stored = zstandard.ZstdCompressor(write_checksum=False).compress(content)
    world.storage._blobs[blob_id] = _Entry(stored, world.clock())


async def test_a_sound_store_is_reported_sound_and_left_alone(world: World) -> None:
    await world.push_closure("a")
    await world.sccache.put(world.main, "k/one", body(b"entry" * 100))
    before = await world.storage.state()
    report = await verify(world.storage, ["main"], repair=True, clock=world.clock)
    assert report.sound and report.removed == []
    assert report.blobs == await world.blob_count() == 4
    assert report.decoded_bytes > 3 * 2000
    assert await world.storage.state() == before
    assert "everything is sound" in report.render()


async def test_a_nar_overwritten_at_rest_is_found_and_repair_lets_nix_upload_it_again(
    world: World,
) -> None:
    paths = await world.push_closure("a")
    other = await world.push("other", xz=True)
    blob = await nar_blob(world, paths[1])
    info = await world.narinfo(paths[1])
    assert info is not None
    overwrite(world, blob, b"\0" * info.nar_size)  # of the same size: only the hash tells
    before = await world.storage.state()

    report = await verify(world.storage, ["main"], clock=world.clock)
    assert not report.sound and "hashes otherwise" in report.damaged_blobs[blob]
    nar_key = next(k for k, why in report.damaged_objects.items() if "/nar/" in k)
    assert report.damaged_objects[keys.narinfo("main", hash_part(paths[1]))].endswith(
        f"its NAR record {nar_key} is damaged"
    )
    assert len(report.damaged_objects) == 2
    assert await world.storage.state() == before  # no repair: nothing changed
    assert "--repair" in report.render()

    world.clock.advance(10)
    report = await verify(world.storage, ["main"], repair=True, clock=world.clock)
    assert sorted(report.removed) == sorted([*report.damaged_objects, f"blob {blob}"])
    # A caching proxy keeps the NAR's URL a year (immutable): the report names it to purge.
    url = f"/main/nar/{info.nar_hash.nix32()}.nar.zst"
    assert report.kept_urls == [url] and f"\n  {url}" in report.render()
    assert await world.gone(paths[1])
    assert await world.whole(paths[0]) and await world.whole(other)
    assert await world.narinfo(paths[2]) is not None  # a referrer is not removed

    await world.push("a-1", refs=[paths[0]])  # what `nix copy` of the closure now does
    assert await world.whole(paths[2])
    assert (await verify(world.storage, ["main"], clock=world.clock)).sound


async def test_the_name_of_a_compressed_upload_goes_with_its_damaged_record(
    world: World,
) -> None:
    path = await world.push("packed", xz=True)
    blob = await nar_blob(world, path)
    names = [k async for k in world.storage.keys(keys.cache_prefix("main") + "nar-file/")]
    assert len(names) == 1
    world.storage._blobs[blob] = _Entry(b"not zstd at all", world.clock())
    report = await verify(world.storage, ["main"], repair=True, clock=world.clock)
    assert "does not decode" in report.damaged_blobs[blob]
    assert names[0] in report.removed and f"blob {blob}" in report.removed
    assert [k async for k in world.storage.keys("caches/main/")] == []


async def test_a_missing_blob_and_a_record_that_no_longer_parses_are_found(
    world: World,
) -> None:
    gone, corrupt, kept = [await world.push(n) for n in ("gone", "corrupt", "kept")]
    await world.storage.blob_delete(await nar_blob(world, gone))
    corrupt_key = keys.narinfo("main", hash_part(corrupt))
    await world.storage.put(corrupt_key, b"StorePath: nonsense\n")
    report = await verify(world.storage, ["main"], repair=True, clock=world.clock)
    assert any(why.startswith("missing") for why in report.damaged_blobs.values())
    assert report.damaged_objects[corrupt_key] == "does not parse"
    assert corrupt_key in report.removed
    assert await world.gone(gone)
    assert await world.whole(kept)


async def test_a_record_of_another_size_than_its_blob_is_found(world: World) -> None:
    data = b"log line\n" * 300
    settings = world.main
    await world.nix.put_file(settings, "log/abc-drv", body(data), "text/plain")
    key = keys.extra_file("main", "log/abc-drv")
    record = json.loads((await world.storage.get(key)) or b"{}")
    record["size"] = len(data) - 1
    await world.storage.put(key, json.dumps(record).encode())
    report = await verify(world.storage, ["main"], clock=world.clock)
    assert report.damaged_objects == {
        key: f"records {len(data) - 1:,} B for blob {record['blob']}, which decodes to "
        f"{len(data):,} B"
    }
    assert report.damaged_blobs == {}


async def test_a_manifest_with_a_damaged_output_goes_with_its_documents(world: World) -> None:
    identity = Identity("leaf", "leaf", "0.1.0", "lib", "x86_64-unknown-linux-gnu")
    blobs = {}
    for key, name in (("a" * 64, "bad"), ("b" * 64, "good")):
        data = payload(name, 5000)
        blobs[name] = blake3.blake3(data).hexdigest()
        await world.rustc.upload_blob(world.main, blobs[name], body(data))
        outputs = (Output(f"lib{name}.rlib", blobs[name], len(data), 0o644),)
        await world.rustc.put_manifest(world.main, key, Manifest(name, outputs).to_json())
        inputs = InputsDocument(identity, {"format": "larder-rustc/1", "sources": [[name]]})
        await world.rustc.put_inputs(world.main, key, inputs.to_json())
    await world.sccache.put(world.main, "k/entry", body(b"sccache" * 100))
    entry_blob = blake3.blake3(b"sccache" * 100).hexdigest()
    overwrite(world, blobs["bad"], payload("other", 5000))
    overwrite(world, entry_blob, b"x" * 700)

    report = await verify(world.storage, ["main"], repair=True, clock=world.clock)
    assert set(report.damaged_blobs) == {blobs["bad"], entry_blob}
    assert await world.rustc.get_manifest(world.main, "a" * 64) is None
    assert await world.rustc.get_inputs(world.main, "a" * 64) is None
    assert [n.key for n in await world.rustc.nearest(world.main, identity)] == ["b" * 64]
    assert await world.rustc.missing(world.main, [blobs["good"]]) == []
    assert await world.sccache.get(world.main, "k/entry") is None
    assert (await verify(world.storage, ["main"], clock=world.clock)).sound


async def test_what_is_written_again_during_a_repair_stays(world: World) -> None:
    path = await world.push("again")
    blob = await nar_blob(world, path)
    good = world.storage._blobs[blob].data
    overwrite(world, blob, b"\0" * 10)

    async def upload_again(key: str) -> None:
        if world.storage.before_delete is not None:
            world.storage.before_delete = None
            world.clock.advance(5)
            world.storage._blobs[blob] = _Entry(good, world.clock())  # the disk's repair
            await world.push("again")

    world.storage.before_delete = upload_again
    report = await verify(world.storage, ["main"], repair=True, clock=world.clock)
    assert not report.sound and report.removed == []
    assert await world.whole(path)
    assert (await verify(world.storage, ["main"], clock=world.clock)).sound


async def test_unreachable_storage_fails_the_run_and_deletes_nothing(world: World) -> None:
    path = await world.push("x")
    overwrite(world, await nar_blob(world, path), b"\0" * 10)

    async def broken(*args: object) -> None:
        raise StorageUnavailable("storage unreachable")

    world.storage.get = broken  # type: ignore[method-assign,assignment]
    before = await world.storage.state()
    with pytest.raises(StorageUnavailable):
        await verify(world.storage, ["main"], repair=True, clock=world.clock)
    assert await world.storage.state() == before


async def test_a_closure_collected_while_it_looks_is_not_reported_damaged(world: World) -> None:
    path = await world.push("collected")
    kept = await world.push("kept")
    info = await world.narinfo(path)
    assert info is not None
    blob = await nar_blob(world, path)
    listing = world.storage.blob_infos

    async def collected_first() -> AsyncIterator[StoredBlob]:
        # A collection between the listing of objects and that of blobs: referrers first.
        await world.storage.delete(keys.narinfo("main", hash_part(path)))
        await world.storage.delete(keys.nar("main", info.nar_hash.nix32()))
        await world.storage.blob_delete(blob)
        async for found in listing():
            yield found

    early = await world.push("collected-early")
    early_info = await world.narinfo(early)
    assert early_info is not None
    objects = world.storage.object_infos

    async def collected_between_kinds(prefix: str) -> AsyncIterator[ObjectInfo]:
        if prefix.endswith("/nar/"):  # narinfos were listed, NAR records not yet
            await world.storage.delete(keys.narinfo("main", hash_part(early)))
            await world.storage.delete(keys.nar("main", early_info.nar_hash.nix32()))
        async for found in objects(prefix):
            yield found

    world.storage.blob_infos = collected_first  # type: ignore[method-assign]
    world.storage.object_infos = collected_between_kinds  # type: ignore[method-assign]
    report = await verify(world.storage, ["main"], repair=True, clock=world.clock)
    assert report.sound, report.render()
    assert await world.whole(kept)


async def test_a_narinfo_whose_reference_is_gone_is_reported_and_kept(world: World) -> None:
    paths = await world.push_closure("a")
    gone = keys.narinfo("main", hash_part(paths[0]))
    await world.storage.delete(gone)
    report = await verify(world.storage, ["main"], repair=True, clock=world.clock)
    top, middle = (keys.narinfo("main", hash_part(p)) for p in paths[2:0:-1])
    assert report.incomplete == {
        top: f"its reference {gone} is missing",
        middle: f"its reference {gone} is missing",
    }
    assert not report.sound and report.removed == [] and report.damaged_objects == {}
    assert "incomplete closures: 2 narinfos" in report.render()
    assert "--repair" not in report.render()
    assert await world.narinfo(paths[2]) is not None
    await world.push("a-0")  # pushed again: complete
    assert (await verify(world.storage, ["main"], clock=world.clock)).sound


@pytest.mark.parametrize("held", [False, True])
async def test_a_blob_deleted_while_it_is_read_is_missing_only_if_still_held(
    world: World, held: bool
) -> None:
    """S3 opens a blob with a HEAD and reads it with a GET: a collection reaping it between
    the two makes the read fail, which is no damage; a blob an entry still holds is missing."""
    await world.sccache.put(world.main, "k/one", body(b"entry" * 100))
    if not held:
        await world.sccache.delete(world.main, "k/one")  # its blob is unreferenced now
    opening = world.storage.blob_open

    async def reaped_after_the_open(blob_id: str) -> BlobReader | None:
        reader = await opening(blob_id)
        await world.storage.blob_delete(blob_id)
        assert reader is not None

        class Gone(BlobReader):
            async def chunks(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
                raise StorageError("S3 blob read failed: the blob was deleted")
                yield b""

            async def close(self) -> None:
                await reader.close()

        return Gone()

    world.storage.blob_open = reaped_after_the_open  # type: ignore[method-assign]
    report = await verify(world.storage, ["main"], clock=world.clock)
    if held:
        assert list(report.damaged_blobs.values()) == [
            "missing: not stored, yet an object holds it"
        ]
    else:
        assert report.sound, report.render()
