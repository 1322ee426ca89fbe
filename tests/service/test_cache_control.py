"""What a shared cache in front of larder may keep (``Cache-Control``, larder/service/
cache_control.py): a public cache's NARs a year, its narinfos and other Nix objects a minute;
nothing of a private cache; no miss, error, upload answer or API answer."""

from __future__ import annotations

import hashlib

import pytest
import zstandard

from larder.protocol import nix32
from larder.protocol.tokens import Scope
from larder.service import state
from tests.service.conftest import Live, Service
from tests.service.test_nix_routes import hash_part, make_nar, narinfo_text, store_path

NAR = "public, max-age=31536000, immutable"
NARINFO = "public, max-age=60"
PUBLIC = {
    "cache-info": (200, NARINFO),
    "narinfo": (200, NARINFO),
    "narinfo HEAD": (200, NARINFO),
    "nar.zst": (200, NAR),
    "nar.zst HEAD": (200, NAR),
    "nar.zst range": (206, NAR),
    # Names Nix uploads under, which a pusher asks about: kept as briefly as narinfos, so a
    # push after a collection is not told the NAR is still there.
    "nar": (200, NARINFO),
    "upload name": (200, NARINFO),
    "upload name HEAD": (200, NARINFO),
    "ls": (200, NARINFO),
}


async def push(svc: Service, cache: str, token: str) -> tuple[str, str, str]:
    """A store path pushed to ``cache`` as zstd: ``(narinfo URL, NAR URL, the NAR's upload
    URL)``."""
    path, nar = store_path(f"rust_{cache}-1.0"), make_nar(b"cached" * 5000)
    body = zstandard.ZstdCompressor().compress(nar)
    nar_url = f"nar/{nix32.encode(hashlib.sha256(body).digest())}.nar.zst"
    auth = svc.auth(token)
    assert (await svc.client.put(f"/{cache}/{nar_url}", data=body, headers=auth)).status == 200
    info = narinfo_text(path, nar, URL=nar_url, Compression="zstd")
    narinfo = f"/{cache}/{hash_part(path)}.narinfo"
    assert (await svc.client.put(narinfo, data=info, headers=auth)).status == 200
    listing = await svc.client.put(f"/{cache}/{hash_part(path)}.ls", data=b"{}", headers=auth)
    assert listing.status == 200
    served = await (await svc.client.get(narinfo, headers=auth)).text()
    own = f"/{cache}/" + served.split("URL: ", 1)[1].split("\n", 1)[0]
    assert own != f"/{cache}/{nar_url}"
    return narinfo, own, f"/{cache}/{nar_url}"


async def answers(svc: Service, cache: str, token: str | None) -> dict[str, tuple[int, str | None]]:
    """Status and ``Cache-Control`` of every kind of Nix read of a pushed path in ``cache``."""
    writer = await svc.issue(cache, Scope.WRITE)
    narinfo, nar, uploaded = await push(svc, cache, writer)
    auth = svc.auth(token) if token else {}
    seen = {}
    for name, method, url, extra in (
        ("cache-info", "GET", f"/{cache}/nix-cache-info", {}),
        ("narinfo", "GET", narinfo, {}),
        ("narinfo HEAD", "HEAD", narinfo, {}),
        ("nar.zst", "GET", nar, {}),
        ("nar.zst HEAD", "HEAD", nar, {}),
        ("nar.zst range", "GET", nar, {"Range": "bytes=0-9"}),
        ("nar", "GET", nar.removesuffix(".zst"), {}),
        ("upload name", "GET", uploaded, {}),
        ("upload name HEAD", "HEAD", uploaded, {}),
        ("ls", "GET", narinfo.replace(".narinfo", ".ls"), {}),
    ):
        resp = await svc.client.request(method, url, headers={**auth, **extra})
        await resp.read()
        seen[name] = (resp.status, resp.headers.get("Cache-Control"))
    return seen


async def test_a_public_caches_nars_are_kept_a_year_and_the_rest_a_minute(
    service: Service,
) -> None:
    assert await answers(service, "main", None) == PUBLIC


async def test_a_private_caches_answers_are_kept_by_no_shared_cache(service: Service) -> None:
    await service.client.app[state.CACHES].create("secret", private=True)
    reader = await service.issue("secret", Scope.READ)
    private = {name: (status, value.replace("public", "private"))
               for name, (status, value) in PUBLIC.items()}  # fmt: skip
    assert await answers(service, "secret", reader) == private
    without = await service.client.get("/secret/nix-cache-info")
    assert without.status == 401 and without.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize(
    "method,url,auth",
    [
        ("GET", "/main/0123456789abcdfghijklmnpqrsvwxyz.narinfo", False),  # a miss
        ("HEAD", "/main/0123456789abcdfghijklmnpqrsvwxyz.narinfo", False),
        ("GET", "/main/nar/" + "0" * 52 + ".nar.zst", False),
        ("GET", "/main/log/missing", False),
        ("GET", "/nosuchcache/nix-cache-info", False),
        ("PUT", "/main/nix-cache-info", True),  # refused
        ("PUT", "/main/x.ls", False),  # no token
        ("PUT", "/main/x.ls", True),  # stored
        ("GET", "/api/v1/caches/main", False),
        ("GET", "/metrics", False),
        ("GET", "/healthz", False),
        ("GET", "/main/rustc/v1/entries/" + "0" * 64, True),
        ("GET", "/main/sccache/a/b/c/" + "0" * 64, True),
    ],
)
async def test_misses_errors_uploads_and_other_routes_are_not_stored(
    service: Service, method: str, url: str, auth: bool
) -> None:
    headers = service.auth() if auth else {}
    resp = await service.client.request(method, url, data=b"{}", headers=headers)
    await resp.read()
    assert resp.headers["Cache-Control"] == "no-store", (resp.status, dict(resp.headers))


@pytest.mark.parametrize(
    "extra",
    [
        "User-Agent: second/1\r\n",  # a field aiohttp allows once
        "".join(f"X-Field-{i}: {i}\r\n" for i in range(130)),  # more fields than it reads
    ],
    ids=["repeated field", "too many fields"],
)
async def test_a_request_aiohttp_refuses_before_routing_is_not_stored(
    live: Live, extra: str
) -> None:
    """aiohttp answers these 400 itself, before any route: without ``no-store`` a proxy that
    keeps answers with no lifetime of their own served that 400 for the URL to every client."""
    from tests.service.test_fastpath import Conn, get

    conn = await Conn.open(live)
    conn.send(get("/main/nix-cache-info", extra))
    status, headers, _ = await conn.response()
    assert status == 400 and headers["cache-control"] == "no-store", headers
    conn.close()
