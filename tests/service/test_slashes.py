"""Repeated slashes in a request's path are merged before routing, as nginx reads them."""

from __future__ import annotations

import zstandard

from larder.service.front.slashes import merged
from tests.service.conftest import Live
from tests.service.test_fastpath import Conn, get, hash_of, narinfo_for, put


def test_runs_of_slashes_in_the_path_become_one_and_the_query_stays() -> None:
    assert merged("//main//x.narinfo") == "/main/x.narinfo"
    assert merged("/main/nar///a.nar.zst?x=//y") == "/main/nar/a.nar.zst?x=//y"
    assert merged("/main/nix-cache-info") == "/main/nix-cache-info"
    # Routes that are no cache keep their spelling: a proxy rule hiding /metrics by prefix
    # (without merging slashes) was walked around by //metrics.
    for target in ("//metrics", "///api/v1/caches/main", "//healthz", "//readyz", "//Main/x"):
        assert merged(target) == target, target


async def test_a_repeated_slash_reaches_no_route_that_is_not_a_cache(live: Live) -> None:
    conn = await Conn.open(live)
    for target in ("//metrics", "/metrics/", "//api/v1/caches/main", "//healthz"):
        conn.send(get(target))
        assert (await conn.response())[0] == 404, target
    conn.send(get("/metrics"))
    assert (await conn.response())[0] == 200
    conn.close()


async def test_a_cache_url_written_with_a_doubled_slash_works_both_ways(live: Live) -> None:
    """``"${BASE}/main"`` with ``BASE`` ending in ``/``: Nix said the cache "does not appear to
    be a binary cache" and pushes failed, where a static file server answered."""
    store_hash = hash_of("slashes")
    digest, nar, narinfo = narinfo_for(store_hash, b"slashes")
    conn = await Conn.open(live)
    conn.send(get("//main/nix-cache-info"))
    status, _, body = await conn.response()
    assert status == 200 and b"StoreDir: /nix/store" in body
    conn.send(put(f"//main//nar/{digest}.nar", nar, live.token))
    assert (await conn.response())[0] == 200
    conn.send(put(f"/main//{store_hash}.narinfo", narinfo, live.token))
    assert (await conn.response())[0] == 200
    served = []
    for target in (f"/main/{store_hash}.narinfo", f"///main/{store_hash}.narinfo?x=1"):
        conn.send(get(target))
        status, _, body = await conn.response()
        assert status == 200 and f"StorePath: /nix/store/{store_hash}".encode() in body, target
        served.append(body)
    assert served[0] == served[1]
    url = next(line for line in served[0].decode().splitlines() if line.startswith("URL: "))[5:]
    conn.send(get(f"//main//{url}"))
    status, _, body = await conn.response()
    assert status == 200 and zstandard.ZstdDecompressor().decompressobj().decompress(body) == nar
    conn.close()
