"""The client's address behind trusted reverse proxies (``X-Forwarded-For``)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imkit.auth import InsecureDevAuth
from imkit.core.interfaces import HandshakeRequest
from imkit.core.proxies import TrustedProxies, parse_address
from imkit.core.server import App
from imkit.exceptions import ConfigurationError


def xff(*values: str) -> list[tuple[str, str]]:
    return [("host", "chat.example"), *(("x-forwarded-for", v) for v in values)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.2.3.4", "1.2.3.4"),
        (" 1.2.3.4 ", "1.2.3.4"),
        ("1.2.3.4:5678", "1.2.3.4"),
        ("::1", "::1"),
        ("[::1]", "::1"),
        ("[2001:db8::7]:443", "2001:db8::7"),
        ("::ffff:10.0.0.9", "10.0.0.9"),
        ("unknown", None),
        ("", None),
        ("[::1", None),
        ("[::1]x", None),
        ("_hidden", None),
        ("300.1.1.1", None),
    ],
)
def test_parse_address(text: str, expected: str | None) -> None:
    address = parse_address(text)
    assert (str(address) if address is not None else None) == expected


def test_no_trusted_proxy_keeps_the_socket_address() -> None:
    proxies = TrustedProxies()
    assert not proxies
    assert proxies.client_address("127.0.0.1", xff("6.6.6.6")) == "127.0.0.1"


def test_a_connection_from_a_trusted_proxy_is_the_client_it_names() -> None:
    proxies = TrustedProxies(["127.0.0.1", "10.0.0.0/8"])
    assert proxies
    assert proxies.client_address("127.0.0.1", xff("198.51.100.7")) == "198.51.100.7"
    # two proxies: the client, then the first proxy, as the second received it
    assert proxies.client_address("10.0.0.2", xff("198.51.100.7, 10.0.0.1")) == "198.51.100.7"
    # several headers count in order, as one list
    assert proxies.client_address("10.0.0.2", xff("198.51.100.7", "10.0.0.1")) == "198.51.100.7"
    # IPv4-mapped peers and ports in the header
    assert proxies.client_address("::ffff:127.0.0.1", xff("198.51.100.7:1234")) == "198.51.100.7"


def test_what_a_client_writes_itself_is_never_believed() -> None:
    """A client sends ``X-Forwarded-For: 1.1.1.1`` through the trusted proxy, which appends
    the address it really came from: that one is the client's."""
    proxies = TrustedProxies(["10.0.0.0/8"])
    assert proxies.client_address("10.0.0.1", xff("1.1.1.1, 203.0.113.5")) == "203.0.113.5"
    # a connection straight from the client: its header is ignored
    assert proxies.client_address("203.0.113.5", xff("10.0.0.3")) == "203.0.113.5"
    # an address the socket layer could not give stays as it is
    assert proxies.client_address("", xff("1.1.1.1")) == ""


def test_the_walk_stops_where_the_header_stops_being_addresses() -> None:
    proxies = TrustedProxies(["10.0.0.0/8"])
    # "unknown" was written by the trusted 10.0.0.1: it is the last address reached
    assert proxies.client_address("10.0.0.2", xff("203.0.113.5, unknown, 10.0.0.1")) == "10.0.0.1"
    # only trusted proxies in the header: the leftmost one
    assert proxies.client_address("10.0.0.2", xff("10.0.0.1")) == "10.0.0.1"
    # no header: the proxy itself
    assert proxies.client_address("10.0.0.2", [("host", "x")]) == "10.0.0.2"


def test_a_bad_proxy_entry_is_refused() -> None:
    with pytest.raises(ValueError, match="'somewhere'"):
        TrustedProxies(["somewhere"])
    with pytest.raises(ConfigurationError, match="not an address or network"):
        App(auth=InsecureDevAuth(quiet=True), trusted_proxies=["10.0.0.0/33"])
    with pytest.raises(ConfigurationError, match="list of addresses"):
        App(auth=InsecureDevAuth(quiet=True), trusted_proxies="10.0.0.1")


def test_app_client_request_rewrites_remote_addr_only_behind_a_trusted_proxy() -> None:
    request = HandshakeRequest("/ws", headers=xff("203.0.113.5"), remote_addr="10.0.0.1")
    plain = App(auth=InsecureDevAuth(quiet=True))
    assert plain.client_request(request) is request
    proxied = App(auth=InsecureDevAuth(quiet=True), trusted_proxies=["10.0.0.1"])
    rewritten = proxied.client_request(request)
    assert rewritten.remote_addr == "203.0.113.5"
    assert (rewritten.path, rewritten.headers) == (request.path, request.headers)
    direct = HandshakeRequest("/ws", headers=xff("1.1.1.1"), remote_addr="203.0.113.5")
    assert proxied.client_request(direct) is direct


_ipv4 = st.ip_addresses(v=4).map(str)


@given(
    forged=st.lists(st.one_of(_ipv4, st.sampled_from(["unknown", "10.0.0.7", "::1"])), max_size=4),
    client=st.ip_addresses(v=4).filter(lambda a: a not in ipaddress.ip_network("10.0.0.0/8")),
    chain=st.lists(st.integers(1, 250).map(lambda n: f"10.0.0.{n}"), min_size=1, max_size=4),
)
def test_no_header_a_client_writes_moves_its_address(
    forged: list[str], client: ipaddress.IPv4Address, chain: list[str]
) -> None:
    """Whatever a client puts in ``X-Forwarded-For``, after a chain of trusted proxies
    (each appending the address it received the request from) the address found is the
    client's own."""
    proxies = TrustedProxies(["10.0.0.0/8"])
    hops = [*forged, str(client), *chain[:-1]]  # the last proxy's peer is the socket
    headers = xff(", ".join(hops))
    assert proxies.client_address(chain[-1], headers) == str(client)
