"""Tokens never reach the logs; one cache's token opens no other cache."""

from __future__ import annotations

import base64
import urllib.error
import urllib.request
from pathlib import Path

from tests.e2e.harness import http, larder_server
from tests.wait import wait_until


def request(url: str, method: str, headers: dict[str, str], body: bytes = b"") -> int:
    req = urllib.request.Request(url, data=body if method == "PUT" else None, method=method)
    for name, value in headers.items():
        req.add_header(name, value)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def test_tokens_never_appear_in_logs_and_stay_in_their_cache(tmp_path: Path) -> None:
    env = {
        "LARDER_LOG_LEVEL": "debug",
        "LARDER_ACCESS_LOG": "json",
        "LARDER_REFRESH_INTERVAL": "0.2",
    }
    with larder_server(str(tmp_path / "data"), tmp_path, env) as server:
        server.cli("cache", "create", "private", "--private")
        server.cli("cache", "create", "other")
        main_writer = server.token("main", "write")
        private_reader = server.token("private", "read")
        admin, admin_id = server.token_with_id("*", "admin")
        basic = "Basic " + base64.b64encode(f"ci:{main_writer}".encode()).decode()
        url = server.url

        # Accepted where they belong, in either form.
        assert request(f"{url}/main/log/a", "PUT", {"Authorization": basic}, b"x") == 200
        assert request(f"{url}/private/nix-cache-info", "GET",
                       {"Authorization": f"Bearer {private_reader}"}) == 200  # fmt: skip
        # Refused everywhere else.
        assert request(f"{url}/other/log/a", "PUT", {"Authorization": basic}, b"x") == 403
        assert request(f"{url}/private/nix-cache-info", "GET",
                       {"Authorization": f"Bearer {main_writer}"}) == 403  # fmt: skip
        assert request(f"{url}/private/log/a", "PUT",
                       {"Authorization": f"Bearer {private_reader}"}, b"x") == 403  # fmt: skip
        assert request(f"{url}/private/nix-cache-info", "GET", {}) == 401
        # The admin token works, then not once revoked; a tampered one never does.
        admin_auth = {"Authorization": f"Bearer {admin}"}
        assert request(f"{url}/other/log/b", "PUT", admin_auth, b"x") == 200
        server.cli("token", "revoke", admin_id)
        # Every replica re-reads revocations each refresh_interval.
        wait_until(
            lambda: request(f"{url}/other/log/probe", "PUT", admin_auth, b"x") == 401,
            what="the revocation taking effect",
        )
        assert request(f"{url}/other/log/c", "PUT", admin_auth, b"x") == 401
        garbage = admin[:-4] + ("AAAA" if not admin.endswith("AAAA") else "BBBB")
        assert request(f"{url}/main/log/d", "PUT",
                       {"Authorization": f"Bearer {garbage}"}, b"x") == 401  # fmt: skip
        assert http("GET", f"{url}/other/log/c")[0] == 404
        log = server.log()

    assert "PUT /main/log/a" in log or '"path": "/main/log/a"' in log  # the log did record traffic
    for secret in (main_writer, private_reader, admin, basic.split()[1], garbage):
        assert secret not in log
        for piece in secret.split("."):  # no part of a JWT either
            if len(piece) > 16:
                assert piece not in log
