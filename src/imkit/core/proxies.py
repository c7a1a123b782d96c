"""The client's address behind reverse proxies (``X-Forwarded-For``), sans-IO.

A connection that comes through a proxy comes from the proxy's address; the proxy puts
the address it received the request from at the end of ``X-Forwarded-For``. Only the
proxies the application names (:class:`TrustedProxies`) are believed: walking the
header from its end, each hop is taken as long as the address it came from is a trusted
proxy; the first address that is not one is the client's. A client cannot forge its
way past that: whatever it writes into the header itself stands left of what the
trusted proxies appended, and is never reached while an untrusted address comes first.

Every address is compared as an :mod:`ipaddress` address (``::ffff:1.2.3.4`` is
``1.2.3.4``). An entry that is not an address (``unknown``, an obfuscated name) stops
the walk at the address before it: the trusted proxy that passed it on counts as the
client.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

__all__ = ("TrustedProxies", "parse_address")

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network

FORWARDED_FOR = "x-forwarded-for"
"""The header read (lower-cased, as :class:`~imkit.core.interfaces.HandshakeRequest`
keeps header names)."""


def parse_address(text: str) -> _Address | None:
    """``text`` as an IP address: bare (``1.2.3.4``, ``::1``), with a port
    (``1.2.3.4:5678``, ``[::1]:5678``) or bracketed (``[::1]``); ``None`` if it is none."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (end + 1 < len(text) and text[end + 1] != ":"):
            return None
        text = text[1:end]
    elif text.count(":") == 1:  # IPv4 with a port (an IPv6 address has several colons)
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class TrustedProxies:
    """The reverse proxies whose ``X-Forwarded-For`` is believed: addresses or networks
    (``"10.0.0.0/8"``, ``"127.0.0.1"``, ``"::1"``).

    Raises ``ValueError`` for an entry that is neither.
    """

    __slots__ = ("_networks",)

    def __init__(self, proxies: Iterable[str] = ()) -> None:
        networks: list[_Network] = []
        for proxy in proxies:
            try:
                networks.append(ipaddress.ip_network(proxy.strip(), strict=False))
            except ValueError:
                raise ValueError(f"not an address or network: {proxy!r}") from None
        self._networks = tuple(networks)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def trusts(self, address: _Address) -> bool:
        """Whether ``address`` is one of the trusted proxies."""
        return any(address in network for network in self._networks)

    def client_address(self, remote_addr: str, headers: Sequence[tuple[str, str]]) -> str:
        """The client's address for a connection from ``remote_addr`` with ``headers``
        (lower-cased names, in order): ``remote_addr`` itself unless it is a trusted
        proxy, else the first address from the end of ``X-Forwarded-For`` (all such
        headers, in order) that is not a trusted proxy, or where the header runs out or
        stops being addresses. Returned as text (IPv4-mapped IPv6 as IPv4)."""
        if not self._networks:
            return remote_addr
        current = parse_address(remote_addr)
        if current is None or not self.trusts(current):
            return remote_addr
        hops = [hop for name, value in headers if name == FORWARDED_FOR for hop in value.split(",")]
        for hop in reversed(hops):
            previous = parse_address(hop)
            if previous is None:
                break
            current = previous
            if not self.trusts(current):
                break
        return str(current)
