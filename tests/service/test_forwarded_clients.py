"""Behind trusted proxies (``trusted_proxies``), the access log names the client from
X-Forwarded-For, on the short path as in the application; otherwise the connection's peer."""

from __future__ import annotations

import pytest

from larder.service.config import Config, ConfigError, load_config
from tests.service.conftest import Live
from tests.service.test_fastpath import Conn, get, hash_of, upload


@pytest.fixture
def config() -> Config:
    return Config(trusted_proxies="127.0.0.0/8")


async def test_the_log_names_the_client_trusted_proxies_forwarded_for(live: Live) -> None:
    known = hash_of("forwarded")
    setup = await Conn.open(live)
    await upload(live, setup, known)
    setup.close()
    live.sink.flush()
    before = live.log.getvalue().count("\n")
    conn = await Conn.open(live)
    via = "X-Forwarded-For: 192.0.2.1, 203.0.113.7\r\n"
    conn.send(
        get(f"/main/{known}.narinfo", via),  # the short path
        get("/main/nix-cache-info", via),
        get(f"/main/{known}.narinfo", "X-Forwarded-For: 198.51.100.4\r\n"),  # kept bytes
        get(f"/main/{known}.narinfo"),  # no header: the proxy itself
        get("/api/v1/caches/main", via),  # the application
    )
    for _ in range(5):
        assert (await conn.response())[0] == 200
    conn.close()
    live.sink.flush()
    lines = live.log.getvalue().splitlines()[before:]
    clients = [line.split(" aiohttp.access ", 1)[1].split()[0] for line in lines]
    assert clients == ["203.0.113.7", "203.0.113.7", "198.51.100.4", "127.0.0.1", "203.0.113.7"]


def test_trusted_proxies_are_read_from_a_list_or_the_environment_and_checked() -> None:
    from_env = load_config({}, {"LARDER_TRUSTED_PROXIES": "10.0.0.0/8, ::1"})
    assert from_env.trusted_proxies == "10.0.0.0/8,::1/128"
    with pytest.raises(ConfigError, match="trusted_proxies"):
        load_config({}, {"LARDER_TRUSTED_PROXIES": "10.0.0.0/8, proxy.local"})
