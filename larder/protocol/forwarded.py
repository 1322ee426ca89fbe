"""The client behind trusted proxies, from ``X-Forwarded-For`` (the de facto header nginx,
nginx-ingress and most load balancers append the address they received a request from to).

Each proxy appends its peer's address, so the header reads left to right from the first client
to the last proxy's peer, and only the part the trusted proxies wrote can be believed: a client
may send any header it likes. The client is therefore the right-most address not in a trusted
network, reading from the right while every address so far was trusted: the connection's peer
first, then the header's entries. A malformed entry stops the reading (the last trusted address
read is the answer), as does the end of the header (its left-most entry is then the client), or
:data:`MAX_HOPS` entries read (no chain of proxies is that long; a client inside a trusted
network could otherwise make each request walk thousands). An IPv6 zone (``fe80::1%eth0``)
makes an entry malformed: it is free text. IPv4-mapped IPv6 addresses, in a network or an
entry, are their IPv4 address.
"""

from __future__ import annotations

import functools
import ipaddress

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: The most ``X-Forwarded-For`` entries read, from the right.
MAX_HOPS = 16


def parse_networks(text: str) -> tuple[Network, ...]:
    """Networks from comma-separated addresses or CIDR blocks (``10.0.0.0/8, ::1``); raises
    ``ValueError`` naming the first that is neither."""
    networks = []
    for item in (part.strip() for part in text.split(",")):
        if item:
            try:
                network = ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an address or a network") from None
            mapped = getattr(network.network_address, "ipv4_mapped", None)
            if mapped is not None and network.prefixlen >= 96:  # ::ffff:10.0.0.0/104
                network = ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}")
            networks.append(network)
    return tuple(networks)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if "%" in text:  # a zone: free text
        return None
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


#: Headers up to this long are remembered with their answer (16 addresses with ports fit).
REMEMBERED_LENGTH = 1024


def client_address(
    peer: str | None, forwarded_for: str | None, trusted: tuple[Network, ...]
) -> str | None:
    """The address of the client of a request received from ``peer`` with ``X-Forwarded-For``
    ``forwarded_for`` (its values joined with commas), when the proxies in ``trusted`` may be
    believed (see the module); ``peer`` itself when it is not one of them."""
    if not trusted or not forwarded_for or peer is None:
        return peer
    if len(forwarded_for) > REMEMBERED_LENGTH:  # kept, any client could fill memory with them
        return _client_address(peer, forwarded_for, trusted)
    return _remembered(peer, forwarded_for, trusted)


def _client_address(peer: str, forwarded_for: str, trusted: tuple[Network, ...]) -> str:
    current = _address(peer)
    if current is None or not any(current in network for network in trusted):
        return peer
    for entry in forwarded_for.rsplit(",", MAX_HOPS)[::-1][:MAX_HOPS]:
        address = _address(entry)
        if address is None:
            break
        current = address
        if not any(address in network for network in trusted):
            break
    return str(current)


#: The same few proxies and clients, request after request: parsing them costs about as much as
#: the short path's whole answer.
_remembered = functools.lru_cache(maxsize=1024)(_client_address)
