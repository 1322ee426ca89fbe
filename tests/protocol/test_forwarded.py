"""The client behind trusted proxies (larder.protocol.forwarded): only what trusted proxies
wrote into X-Forwarded-For is believed."""

from __future__ import annotations

import pytest

from larder.protocol.forwarded import client_address, parse_networks

TRUSTED = parse_networks("10.0.0.0/8, 127.0.0.1, fd00::/8")


@pytest.mark.parametrize(
    "peer,header,client",
    [
        ("127.0.0.1", None, "127.0.0.1"),  # no header: the peer
        ("127.0.0.1", "", "127.0.0.1"),
        ("127.0.0.1", "203.0.113.7", "203.0.113.7"),  # one trusted proxy
        ("127.0.0.1", "203.0.113.7, 10.1.2.3", "203.0.113.7"),  # a chain of trusted proxies
        ("127.0.0.1", "1.1.1.1, 203.0.113.7", "203.0.113.7"),  # the client's own claim is not
        ("127.0.0.1", "10.0.0.1, 10.0.0.2", "10.0.0.1"),  # all trusted: the left-most
        ("127.0.0.1", "nonsense, 10.0.0.2", "10.0.0.2"),  # malformed: the last trusted read
        ("127.0.0.1", "203.0.113.7:51234", "203.0.113.7"),  # with a port
        ("127.0.0.1", "[2001:db8::1]:443", "2001:db8::1"),
        ("127.0.0.1", "2001:db8::1", "2001:db8::1"),
        ("127.0.0.1", "::ffff:10.0.0.9, 198.51.100.1", "198.51.100.1"),
        ("fd00::5", "::ffff:203.0.113.9", "203.0.113.9"),  # v4-mapped, behind a v6 proxy
        ("127.0.0.1", 'fe80::1%-"DELETE_main"_200', "127.0.0.1"),  # a zone is free text
        ("127.0.0.1", "203.0.113.7, fe80::1%eth0", "127.0.0.1"),
        ("127.0.0.1", ", ".join(["203.0.113.7"] + ["10.0.0.1"] * 15), "203.0.113.7"),
        ("127.0.0.1", ", ".join(["203.0.113.7"] + ["10.0.0.1"] * 16), "10.0.0.1"),  # 16 read
        ("198.51.100.1", "203.0.113.7", "198.51.100.1"),  # an untrusted peer: its header is not
        (None, "203.0.113.7", None),
    ],
)
def test_the_client_is_the_right_most_untrusted_address(
    peer: str | None, header: str | None, client: str | None
) -> None:
    assert client_address(peer, header, TRUSTED) == client


def test_a_proxy_named_as_an_ipv4_mapped_address_is_trusted() -> None:
    """Behind a server listening on ``[::]`` the log shows IPv4 peers as ``::ffff:a.b.c.d``: an
    operator who copies that form into the setting means the IPv4 address."""
    mapped = parse_networks("::ffff:10.0.0.0/104, ::ffff:192.0.2.1")
    assert [str(n) for n in mapped] == ["10.0.0.0/8", "192.0.2.1/32"]
    assert client_address("::ffff:10.1.2.3", "203.0.113.7", mapped) == "203.0.113.7"


def test_a_long_header_is_read_no_further_than_a_chain_of_proxies() -> None:
    header = ", ".join(["10.0.0.1"] * 100_000)
    assert client_address("127.0.0.1", header, TRUSTED) == "10.0.0.1"


def test_only_short_headers_are_remembered() -> None:
    """Answers are remembered (parsing costs as much as a short-path answer), but a long header
    kept as a key would let any client fill a server's memory, 1 MB an entry."""
    from larder.protocol import forwarded

    before = forwarded._remembered.cache_info().currsize
    for i in range(50):
        long = ", ".join([f"10.0.{i}.1"] * 200)
        assert client_address("127.0.0.1", long, TRUSTED) == f"10.0.{i}.1"
    assert forwarded._remembered.cache_info().currsize == before
    assert client_address("127.0.0.1", "203.0.113.99", TRUSTED) == "203.0.113.99"
    assert forwarded._remembered.cache_info().currsize == before + 1


def test_nothing_is_believed_without_trusted_proxies() -> None:
    assert client_address("127.0.0.1", "203.0.113.7", ()) == "127.0.0.1"


@pytest.mark.parametrize("text", ["10.0.0.0/33", "example.com", "10.0.0.1/8/1", "::g"])
def test_a_setting_that_is_no_network_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not an address or a network"):
        parse_networks(f"127.0.0.1, {text}")
