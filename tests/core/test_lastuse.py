"""Recorded uses: batched writes per cache, merging, compaction, and what happens on failure."""

from __future__ import annotations

import json

import pytest

from larder.core import keys
from larder.core.lastuse import UseRecorder, compact_uses, load_uses
from larder.errors import StorageUnavailable
from larder.storage.memory import MemoryStorage
from tests.core.gcworld import Clock


async def test_touches_are_written_as_one_batch_per_cache() -> None:
    clock = Clock()
    storage = MemoryStorage(clock=clock)
    recorder = UseRecorder(storage, clock=clock)
    for _ in range(1000):  # many reads of the same objects cost nothing extra
        recorder.touch(keys.narinfo("main", "a" * 32))
        recorder.touch(keys.sccache_entry("pr", "x/y"))
    clock.advance(5.5)
    recorder.touch(keys.narinfo("main", "b" * 32))
    recorder.touch("config/not-a-cache-key")  # ignored: not a cache's content
    assert await recorder.flush() == 3
    main = [k async for k in storage.keys(keys.use_batch_prefix("main"))]
    pr = [k async for k in storage.keys(keys.use_batch_prefix("pr"))]
    assert len(main) == len(pr) == 1
    batch = await storage.get(main[0])
    assert batch is not None
    assert json.loads(batch) == {f"narinfo/{'a' * 32}": 1_000_000, f"narinfo/{'b' * 32}": 1_000_006}
    assert await recorder.flush() == 0  # nothing new: nothing written
    assert len([k async for k in storage.keys(keys.USE_PREFIX)]) == 2


async def test_load_merges_latest_and_compaction_keeps_later_batches() -> None:
    clock = Clock()
    storage = MemoryStorage(clock=clock)
    recorder = UseRecorder(storage, clock=clock)
    recorder.touch(keys.narinfo("main", "a" * 32))
    await recorder.flush()
    clock.advance(100)
    recorder.touch(keys.narinfo("main", "a" * 32))
    await recorder.flush()
    await storage.put(keys.use_batch_prefix("main") + "1-corrupt", b"[1, 2")
    read = await load_uses(storage, "main")
    assert read.times == {f"narinfo/{'a' * 32}": 1_000_100}
    assert len(read.batches) == 3
    clock.advance(1)
    recorder.touch(keys.narinfo("main", "b" * 32))
    await recorder.flush()  # written after the load: must survive the compaction
    await compact_uses(storage, "main", read.times, read)
    left = [k async for k in storage.keys(keys.use_batch_prefix("main"))]
    assert len(left) == 1
    again = await load_uses(storage, "main")
    assert again.times == {f"narinfo/{'a' * 32}": 1_000_100, f"narinfo/{'b' * 32}": 1_000_101}


async def test_a_failed_flush_keeps_the_uses_for_the_next() -> None:
    clock = Clock()

    class Flaky(MemoryStorage):
        failing = True

        async def put(self, key: str, data: bytes) -> None:
            if self.failing:
                raise StorageUnavailable("S3 put failed: connection refused")
            await super().put(key, data)

    storage = Flaky(clock=clock)
    recorder = UseRecorder(storage, clock=clock)
    recorder.touch(keys.narinfo("main", "a" * 32))
    with pytest.raises(StorageUnavailable):
        await recorder.flush()
    assert recorder.pending == 1
    storage.failing = False
    assert await recorder.flush() == 1
    assert recorder.pending == 0


def test_a_full_recorder_drops_new_keys_and_counts_them() -> None:
    recorder = UseRecorder(MemoryStorage(), max_pending=2)
    for name in ("a", "b", "c", "d"):
        recorder.touch(keys.narinfo("main", name * 32))
    recorder.touch(keys.narinfo("main", "a" * 32))  # known keys still move forward
    assert recorder.pending == 2 and recorder.dropped == 2
