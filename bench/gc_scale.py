"""How long a garbage collection takes and how much memory it needs, against a floor.

    .venv/bin/python bench/gc_scale.py --paths 20000            # a table
    .venv/bin/python bench/gc_scale.py --paths 5000 --json

It fills a disk store through the storage interface with ``--paths`` store paths in chains of
``--chain`` (each path refers to every earlier one of its chain, as crates do), each with its
NAR record and a small blob, and ages everything by a day (in a child process, so that filling
does not count in the memory figures). Then, in this process:

1. **floor**: a Python walk that stats and reads every file under ``objects/`` and stats every
   blob (what any collector must at least do on this layout);
2. **dry run**: ``Collector.run(dry_run=True)``: list, read and plan, from a cold collector;
3. **collect**: a cap of half the store, for real: the deletes (conditional, referrers first),
   the restore check, reaping the freed blobs, compaction;
4. **again**: a dry run by the same collector, which re-reads only what changed.

Each phase's wall time, the objects it judged per second, and the growth of this process's
peak RSS (``ru_maxrss``) while it ran. The ratio is the dry run against the floor.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from larder.core import keys
from larder.core.blobs import BlobStore
from larder.core.caches import CacheRegistry
from larder.core.gc.collector import Collector
from larder.core.gc.plan import Policy
from larder.core.nixcache import NarRecord
from larder.protocol import nix32
from larder.storage.disk import DiskStorage

GRACE = 600.0


def peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


async def fill(storage: DiskStorage, paths: int, chain: int, blob_size: int) -> int:
    """Write ``paths`` narinfos with records and blobs; the number of objects written."""
    await CacheRegistry(storage).ensure("main")
    executor = ThreadPoolExecutor(4)
    blobs = BlobStore(storage, executor)
    gate = asyncio.Semaphore(16)

    def name(index: int) -> tuple[str, str]:
        digest = hashlib.sha256(f"p{index}".encode()).digest()[:20]
        return nix32.encode(digest), f"crate-{index}"

    async def one(index: int) -> None:
        async with gate:
            store_hash, base = name(index)
            payload = os.urandom(blob_size)
            blob = await blobs.store(_once(payload))
            nar_hash = nix32.encode(hashlib.sha256(payload).digest())
            record = NarRecord(blob.blob_id, len(payload), blob.stored_size)
            await storage.put(keys.nar("main", nar_hash), record.to_json())
            first = index - index % chain
            refs = [f"{h}-{b}" for h, b in (name(i) for i in range(first, index))]
            text = (
                f"StorePath: /nix/store/{store_hash}-{base}\nURL: nar/{nar_hash}.nar.zst\n"
                f"Compression: zstd\nFileSize: {blob.stored_size}\nNarHash: sha256:{nar_hash}\n"
                f"NarSize: {len(payload)}\nReferences: {' '.join([*refs, store_hash + '-' + base])}"
                "\n"
            )
            await storage.put(keys.narinfo("main", store_hash), text.encode())

    try:
        await asyncio.gather(*(one(i) for i in range(paths)))
    finally:
        executor.shutdown()
    return 2 * paths


async def _once(data: bytes):  # type: ignore[no-untyped-def]
    yield data


def age(root: Path, seconds: float) -> None:
    when = time.time() - seconds
    for directory, _, files in os.walk(root):
        for file in files:
            os.utime(os.path.join(directory, file), (when, when))


def floor(root: Path) -> tuple[float, int]:
    """Stat and read every object file, stat every blob: seconds and files."""
    started = time.perf_counter()
    count = 0
    for directory, _, files in os.walk(root / "objects"):
        for file in files:
            path = os.path.join(directory, file)
            os.stat(path)
            with open(path, "rb") as handle:
                handle.read()
            count += 1
    for directory, _, files in os.walk(root / "blobs"):
        for file in files:
            os.stat(os.path.join(directory, file))
            count += 1
    return time.perf_counter() - started, count


async def fill_only(root: Path, args: argparse.Namespace) -> None:
    storage = DiskStorage(root)
    await fill(storage, args.paths, args.chain, args.blob_size)
    await storage.close()
    age(root, 86400)


async def measure(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="larder-gc-bench-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        command = [sys.executable, __file__, "--fill", tmp, "--paths", str(args.paths),
                   "--chain", str(args.chain), "--blob-size", str(args.blob_size)]  # fmt: skip
        subprocess.run(command, check=True)
        filled = time.perf_counter() - started
        objects = 2 * args.paths
        storage = DiskStorage(root)
        results: dict[str, object] = {
            "paths": args.paths,
            "objects": objects,
            "blobs": args.paths,
            "fill_s": round(filled, 2),
        }
        floor_s, files = floor(root)
        results["floor"] = {"seconds": round(floor_s, 3), "files": files}
        collector = Collector(storage, settle=0)

        async def phase(label: str, dry_run: bool, cap: int | None) -> dict[str, object]:
            before = peak_kib()
            began = time.perf_counter()
            report = await collector.run(
                {"main": Policy(max_size=cap, grace=GRACE)},
                caches=["main"],
                grace=GRACE,
                dry_run=dry_run,
            )
            took = time.perf_counter() - began
            judged = sum(t.objects for t in report.caches["main"].before.values())
            return {
                "phase": label,
                "seconds": round(took, 3),
                "objects_per_s": round(judged / took) if took else None,
                "evicted": report.evicted_objects,
                "blobs_reaped": report.blobs_reaped,
                "peak_rss_growth_mib": round((peak_kib() - before) / 1024, 1),
                "size_before": report.caches["main"].size_before,
                "size_after": report.caches["main"].size_after,
            }

        dry = await phase("dry run (cold)", True, None)
        cap = int(dry["size_before"]) // 2  # type: ignore[call-overload]
        done = await phase("collect (cap: half)", False, cap)
        again = await phase("again (warm)", True, cap)
        await storage.close()
        results["phases"] = [dry, done, again]
        results["dry_run_vs_floor"] = round(float(dry["seconds"]) / floor_s, 2)  # type: ignore[arg-type]
        return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", type=int, default=20000)
    parser.add_argument("--chain", type=int, default=20, help="paths per closure")
    parser.add_argument("--blob-size", type=int, default=512)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--fill", help=argparse.SUPPRESS)  # the child that fills DIR
    args = parser.parse_args()
    if args.fill:
        asyncio.run(fill_only(Path(args.fill), args))
        return 0
    results = asyncio.run(measure(args))
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(
        f"{results['paths']:,} paths ({results['objects']:,} objects, {results['blobs']:,} "
        f"blobs), filled in {results['fill_s']} s"
    )
    floor_ = results["floor"]
    print(f"floor (stat+read every file): {floor_['seconds']} s for {floor_['files']:,} files")  # type: ignore[index]
    print(f"{'phase':<22}{'seconds':>9}{'objects/s':>11}{'evicted':>9}{'blobs':>7}{'RSS+MiB':>9}")
    for row in results["phases"]:  # type: ignore[attr-defined]
        print(
            f"{row['phase']:<22}{row['seconds']:>9}{row['objects_per_s']:>11,}"
            f"{row['evicted']:>9,}{row['blobs_reaped']:>7,}{row['peak_rss_growth_mib']:>9}"
        )
    print(f"dry run / floor: {results['dry_run_vs_floor']}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
