"""Many uploads at once, of the same and of different NARs, end consistent with nothing lost."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import zstandard

from larder.protocol import nix32
from larder.protocol.nar import write_nar
from larder.storage.disk import DiskStorage
from tests.service.conftest import Service, ServiceFactory
from tests.service.test_nix_routes import hash_part, nar_url, narinfo_text

STORE = "/nix/store/"


def store_path(n: int) -> str:
    digest = nix32.encode(hashlib.sha256(f"path-{n}".encode()).digest()[:20])
    return f"{STORE}{digest}-rust_crate{n}-1.0.0"


async def put(svc: Service, path: str, data: bytes) -> int:
    resp = await svc.client.put(path, data=data, headers=svc.auth())
    await resp.read()
    return resp.status


async def test_200_concurrent_uploads_of_same_and_different_nars(
    make_service: ServiceFactory, tmp_path: Path
) -> None:
    svc = await make_service(DiskStorage(str(tmp_path)))
    same = write_nar({"type": "regular", "contents": os.urandom(200_000)})
    different = [write_nar({"type": "regular", "contents": os.urandom(20_000 + n)})
                 for n in range(100)]  # fmt: skip
    # 100 uploads of one NAR, in two compressions, and 100 of different NARs, all at once.
    jobs = []
    for n in range(100):
        body = zstandard.ZstdCompressor(level=1 + n % 3).compress(same) if n % 2 else same
        jobs.append(put(svc, f"/main/{nar_url(body, '.zst' if n % 2 else '')}", body))
    jobs += [put(svc, f"/main/{nar_url(nar, '')}", nar) for nar in different]
    statuses = await asyncio.gather(*jobs)
    assert statuses == [200] * 200

    # Narinfos for all of them, again all at once, the shared one claimed by 20 paths.
    paths = [(store_path(n), different[n]) for n in range(100)]
    paths += [(store_path(1000 + n), same) for n in range(20)]
    statuses = await asyncio.gather(*(
        put(svc, f"/main/{hash_part(path)}.narinfo", narinfo_text(path, nar))
        for path, nar in paths
    ))  # fmt: skip
    assert statuses == [200] * len(paths)

    # Everything reads back whole; the shared NAR is stored once.
    blobs = [b async for b in svc.storage.blob_ids()]
    assert len(blobs) == 101
    for path, nar in paths:
        resp = await svc.client.get(f"/main/{hash_part(path)}.narinfo")
        assert resp.status == 200
        url = next(
            line[5:] for line in (await resp.text()).splitlines() if line.startswith("URL: ")
        )
        served = await (await svc.client.get(f"/main/{url}")).read()
        assert zstandard.ZstdDecompressor().decompressobj().decompress(served) == nar
    left = [p.name for p in (tmp_path / "tmp").iterdir() if p.name != "reserve"]
    assert left == []  # no temporary left behind (the reserve is kept on purpose)


async def test_racing_narinfo_uploads_leave_one_complete_narinfo(service: Service) -> None:
    nar = write_nar({"type": "regular", "contents": b"racing"})
    assert await put(service, f"/main/{nar_url(nar, '')}", nar) == 200
    path = store_path(7)
    variants = [narinfo_text(path, nar, Deriver=f"{'a' * 32}-v{n}.drv") for n in range(50)]
    statuses = await asyncio.gather(
        *(put(service, f"/main/{hash_part(path)}.narinfo", body) for body in variants)
    )
    assert statuses == [200] * 50
    served = await (await service.client.get(f"/main/{hash_part(path)}.narinfo")).text()
    derivers = [line for line in served.splitlines() if line.startswith("Deriver: ")]
    assert len(derivers) == 1 and derivers[0].endswith(".drv")  # one whole version, not a mix
    assert served.count("StorePath: ") == 1
