"""larder behind a caching proxy (nginx's ``proxy_cache``, as a CDN in front of it would be),
configured as operators do: answers kept 10 minutes unless the origin says otherwise. What the
proxy keeps is what larder's ``Cache-Control`` allows: a private cache's answers are never given
to a client without its token, a miss is not kept past the push that fills it, and the NARs and
narinfos of a public cache are served from the proxy, to real Nix too."""

from __future__ import annotations

import hashlib
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from larder.protocol import nix32
from larder.protocol.nar import write_nar
from tests.e2e.harness import Larder, larder_server
from tests.e2e.nginx import nginx_server
from tests.e2e.nix import Nix, NixVersion, netrc_for

PROXY_HTTP = """
  proxy_cache_path {cache} levels=1:2 keys_zone=larder:10m max_size=1g inactive=1d;
  log_format cached '$request_method $uri $status $upstream_cache_status';
"""
PROXY_SERVER = """
    access_log {log} cached;
    location / {{
      proxy_pass http://127.0.0.1:{port};
      proxy_cache larder;
      proxy_cache_valid 200 404 10m;
{bypass}      add_header X-Cache-Status $upstream_cache_status always;
      client_max_body_size 0;
      proxy_request_buffering off;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
"""


@dataclass
class Proxied:
    larder: Larder
    url: str
    log: Path

    def cache_statuses(self, suffix: str) -> list[str]:
        """nginx's cache status of each GET whose path ends with ``suffix``, in order."""
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [line.split()[3] for line in lines if line.split()[1].endswith(suffix)]


#: What docs/operating.md adds: requests with a token are neither answered from nor kept.
BYPASS = """
      proxy_cache_bypass $http_authorization;
      proxy_no_cache $http_authorization;
      proxy_cache_convert_head off;
      proxy_cache_key "$request_method $scheme$proxy_host$request_uri";
"""


@contextmanager
def proxied_larder(
    tmp_path: Path, bypass: bool = True, env: dict[str, str] | None = None
) -> Iterator[Proxied]:
    """larder behind nginx configured as the docs say (without the token bypass: as operators
    may, when larder's own answers must keep a private cache's answers out of the proxy)."""
    with larder_server(str(tmp_path / "data"), tmp_path, extra_env=env) as server:
        port = int(server.url.rsplit(":", 1)[1])
        work, log = tmp_path / "nginx", tmp_path / "nginx" / "access.log"
        extra = PROXY_HTTP.format(cache=work / "cache")
        body = PROXY_SERVER.format(log=log, port=port, bypass=BYPASS if bypass else "")
        with nginx_server(work, body, http_extra=extra) as nginx:
            yield Proxied(server, nginx.url, log)


def get(url: str, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def put(url: str, body: bytes, token: str) -> None:
    request = urllib.request.Request(url, data=body, method="PUT")
    request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=30) as resp:
        assert resp.status == 200


def push(server: Larder, cache: str, name: str) -> tuple[str, str]:
    """Push a one-file store path to ``cache`` directly: ``(narinfo URL path, NAR URL path)``
    under the cache."""
    nar = write_nar({"type": "regular", "contents": name.encode() * 1000})
    digest = nix32.encode(hashlib.sha256(nar).digest())
    store_hash = nix32.encode(hashlib.sha256(name.encode()).digest()[:20])
    token = server.token(cache)
    put(f"{server.url}/{cache}/nar/{digest}.nar", nar, token)
    narinfo = (
        f"StorePath: /nix/store/{store_hash}-{name}\nURL: nar/{digest}.nar\nCompression: none\n"
        f"NarHash: sha256:{digest}\nNarSize: {len(nar)}\nReferences: \n"
    )
    put(f"{server.url}/{cache}/{store_hash}.narinfo", narinfo.encode(), token)
    served = get(f"{server.url}/{cache}/{store_hash}.narinfo", token)[2].decode()
    url = next(line for line in served.splitlines() if line.startswith("URL: "))[5:]
    return f"{store_hash}.narinfo", url


def test_a_private_caches_answers_never_reach_a_client_without_its_token(tmp_path: Path) -> None:
    with proxied_larder(tmp_path, bypass=False) as proxied:  # larder's answers alone
        proxied.larder.cli("cache", "create", "team", "--private")
        narinfo_path, nar_path = push(proxied.larder, "team", "rust_secret-1.0")
        token = proxied.larder.token("team", "read")
        urls = [f"{proxied.url}/team/{path}" for path in ("nix-cache-info", narinfo_path, nar_path)]
        for url in urls:
            status, headers, _ = get(url, token)
            assert status == 200, url
            assert headers["Cache-Control"].startswith("private"), (url, headers)
        for url in urls:  # the same URLs again, without the token: the proxy kept none of them
            status, headers, body = get(url)
            assert status == 401, (url, status, body[:80])
            assert headers["X-Cache-Status"] != "HIT"


def test_a_miss_is_not_kept_past_the_push_that_fills_it(tmp_path: Path) -> None:
    with proxied_larder(tmp_path) as proxied:
        name = "rust_late-1.0"
        store_hash = nix32.encode(hashlib.sha256(name.encode()).digest()[:20])
        status, headers, _ = get(f"{proxied.url}/main/{store_hash}.narinfo")
        assert status == 404 and headers["Cache-Control"] == "no-store"
        narinfo_path, nar_path = push(proxied.larder, "main", name)
        assert get(f"{proxied.url}/main/{narinfo_path}")[0] == 200
        assert get(f"{proxied.url}/main/{nar_path}")[0] == 200


def test_a_push_after_a_collection_is_not_told_the_nar_is_still_there(tmp_path: Path) -> None:
    """Nix asks whether a NAR is there (HEAD, under the name it uploads) before sending it;
    nginx answers a HEAD from a kept GET. A kept answer for a collected NAR made the push skip
    it and its narinfo fail with 400."""
    # The server forgets what it served after refresh_interval (an outside collection).
    with proxied_larder(tmp_path, env={"LARDER_REFRESH_INTERVAL": "1"}) as proxied:
        narinfo_path, _ = push(proxied.larder, "main", "rust_gone-1.0")
        uploaded = f"{proxied.url}/main/{narinfo_path}"
        nar = get(uploaded)[2].decode().split("URL: ", 1)[1].split("\n", 1)[0]
        for url in (uploaded, f"{proxied.url}/main/{nar}"):
            assert get(url)[0] == 200  # a laptop reads it through the proxy, which keeps it
        time.sleep(1.5)  # past the shortest grace
        report = proxied.larder.cli("gc", "--cache", "main", "--max-size", "1", "--grace", "1")
        assert "evicted 2 objects" in report, report
        time.sleep(1.5)  # past refresh_interval
        token = proxied.larder.token()
        for url in (uploaded, f"{proxied.url}/main/{nar}"):
            request = urllib.request.Request(url, method="HEAD")
            request.add_header("Authorization", f"Bearer {token}")
            try:
                with urllib.request.urlopen(request, timeout=30) as resp:
                    status = resp.status
            except urllib.error.HTTPError as err:
                status = err.code
            assert status == 404, url


def test_a_public_caches_nars_and_narinfos_are_served_from_the_proxy(tmp_path: Path) -> None:
    with proxied_larder(tmp_path) as proxied:
        narinfo_path, nar_path = push(proxied.larder, "main", "rust_shared-1.0")
        for path in (narinfo_path, nar_path, "nix-cache-info"):
            first = get(f"{proxied.url}/main/{path}")
            second = get(f"{proxied.url}/main/{path}")
            assert first[0] == second[0] == 200 and first[2] == second[2]
            assert first[1]["Cache-Control"].startswith("public, max-age="), first[1]
            assert second[1]["X-Cache-Status"] == "HIT", (path, second[1])


@pytest.mark.nix
def test_nix_substitutes_a_closure_through_the_caching_proxy(
    tmp_path: Path, nix_version: NixVersion
) -> None:
    with proxied_larder(tmp_path) as proxied:
        server = proxied.larder
        ci = Nix(tmp_path / "ci", netrc=netrc_for(server.token()), version=nix_version)
        paths = ci.build_closure(tmp_path)
        closure = ci.closure(paths["app"])
        dumps = {path: hashlib.sha256(ci.dump(path)).digest() for path in closure}
        ci.copy_to(f"{server.url}/main", paths["app"])
        ci.delete(*reversed(closure))
        public_key = str(server.cache_info()["public_key"])
        for laptop_name in ("laptop", "second-laptop"):
            laptop = Nix(tmp_path / laptop_name, version=nix_version)
            laptop.substitute(f"{proxied.url}/main", public_key, paths["app"])
            for path in closure:
                assert hashlib.sha256(laptop.dump(path)).digest() == dumps[path], path
            if laptop.root is None:  # Debian's Nix shares the machine's store
                laptop.delete(*reversed(closure))
        statuses = proxied.cache_statuses(".nar.zst")
        # Each NAR came from larder once, for the first laptop, then from the proxy.
        assert statuses.count("MISS") == len(closure) and statuses.count("HIT") == len(closure)


def test_a_pusher_asking_whether_an_upload_is_there_gets_larders_answer(tmp_path: Path) -> None:
    """Nix 2.34 asks ``HEAD nar/<FileHash>.nar.xz`` before an upload: larder answers it (200)
    for an upload it holds, but serves no ``GET`` of that name, and nginx sent every ``HEAD``
    as a ``GET``, bypassed or not: the NAR was uploaded again."""
    import lzma

    with proxied_larder(tmp_path) as proxied:
        server = proxied.larder
        nar = write_nar({"type": "regular", "contents": b"packed" * 1000})
        packed = lzma.compress(nar, format=lzma.FORMAT_XZ)
        file_hash = nix32.encode(hashlib.sha256(packed).digest())
        token = server.token()
        put(f"{server.url}/main/nar/{file_hash}.nar.xz", packed, token)
        request = urllib.request.Request(
            f"{proxied.url}/main/nar/{file_hash}.nar.xz", method="HEAD"
        )
        request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=30) as resp:
            assert resp.status == 200
