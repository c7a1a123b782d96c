"""The opening handshake, server and client side: what HTTP answer a client gets, and why."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest

from imkit.core.ack import AckMode, Receiver, Sender
from imkit.core.conn import (
    ACK_MODE_HEADER,
    ClientConn,
    ConnLimits,
    ConnState,
    ServerConn,
    origin_allowed,
)
from imkit.core.events import (
    Closed,
    Connected,
    HandshakeRequested,
    HttpRequested,
    Rejected,
)
from imkit.core.interfaces import Identity
from imkit.core.peer import PeerOptions
from imkit.exceptions import LocalProtocolError

from .helpers import KEY, header_of, kinds, status_of, upgrade_request

APP = "https://app.example.com"


def serve(request: bytes, **kw: object) -> ServerConn:
    conn = ServerConn(now=0.0, **kw)  # type: ignore[arg-type]
    conn.receive_data(request, 0.0)
    return conn


def refused(request: bytes, status: int, **kw: object) -> bytes:
    """Feed ``request``; assert the client got HTTP ``status`` and the connection ended."""
    conn = serve(request, **kw)
    response = conn.data_to_send()
    assert status_of(response) == status, response
    events = conn.events()
    assert events and isinstance(events[-1], Closed) and events[-1].code == 1006
    assert f"HTTP {status}" in events[-1].reason
    assert conn.closed and conn.state is ConnState.CLOSED
    assert b"Connection: close" in response
    return response


# ---------------------------------------------------------------------- server
def test_a_valid_upgrade_asks_the_application_to_decide() -> None:
    request = upgrade_request(
        "/ws?token=abc&deviceId=d1&token=second",
        extra=[("Sec-WebSocket-Protocol", "token.xyz, chat"), ("X-Custom", "v")],
    )
    conn = ServerConn(now=0.0, remote_addr="10.0.0.1:5000")
    for i in range(len(request)):  # one byte at a time: the head is reassembled
        conn.receive_data(request[i : i + 1], 0.0)
    (event,) = conn.events()
    assert isinstance(event, HandshakeRequested)
    req = event.request
    assert req.path == "/ws" and req.remote_addr == "10.0.0.1:5000"
    assert req.query == {"token": "abc", "deviceId": "d1"}  # the first value wins
    assert req.header("X-CUSTOM") == "v" and req.header("missing", "d") == "d"
    assert ("x-custom", "v") in req.headers  # names lower-cased, order kept
    assert list(req.subprotocols) == ["token.xyz", "chat"]
    assert conn.data_to_send() == b"" and conn.state is ConnState.HANDSHAKE


def test_accept_answers_101_with_the_ack_mode_header() -> None:
    conn = serve(upgrade_request())
    conn.events()
    conn.accept(
        Identity("alice"),
        0.0,
        options=PeerOptions(ack_mode=AckMode.RIGOR),
        headers=[("X-Server", "imkit")],
    )
    response = conn.data_to_send()
    assert status_of(response) == 101
    assert header_of(response, ACK_MODE_HEADER) == "rigor"
    assert header_of(response, "x-server") == "imkit"
    # RFC 6455 §4.2.2: base64(SHA-1(key + the protocol's GUID)).
    digest = hashlib.sha1((KEY + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
    assert header_of(response, "sec-websocket-accept") == base64.b64encode(digest).decode()
    assert conn.state is ConnState.OPEN and conn.identity == Identity("alice")
    assert conn.peer is not None and conn.peer.user_id == "alice"
    with pytest.raises(LocalProtocolError):
        conn.accept(Identity("alice"), 0.0)
    with pytest.raises(LocalProtocolError):
        conn.reject(401)


def test_accept_can_share_the_identitys_receiver() -> None:
    receiver = Receiver(AckMode.ONLY)
    conn = serve(upgrade_request())
    conn.accept(Identity("alice"), 0.0, receiver=receiver)
    assert conn.peer is not None and conn.peer.receiver is receiver


def test_accept_without_a_request_is_misuse() -> None:
    conn = ServerConn(now=0.0)
    with pytest.raises(LocalProtocolError, match="no handshake"):
        conn.accept(Identity("alice"), 0.0)


def test_reject_answers_the_status_before_any_upgrade() -> None:
    conn = serve(upgrade_request())
    conn.reject(401, "missing token", [("WWW-Authenticate", "Bearer")])
    response = conn.data_to_send()
    assert status_of(response) == 401 and response.endswith(b"\r\n\r\nmissing token\n")
    assert header_of(response, "www-authenticate") == "Bearer"
    assert kinds(conn.events()) == ["HandshakeRequested", "Closed"]
    other = serve(upgrade_request())
    other.reject(403)
    assert other.data_to_send().endswith(b"Forbidden\n")
    unusual = serve(upgrade_request())
    unusual.reject(499)  # not a standard status: still answered
    assert unusual.data_to_send().startswith(b"HTTP/1.1 499 Error\r\n")


def test_wrong_path_is_404() -> None:
    refused(upgrade_request("/chat"), 404)
    refused(upgrade_request("/ws/"), 404)
    pattern = re.compile(r"/ws/(\w+)")
    conn = serve(upgrade_request("/ws/room1"), path=pattern)
    assert kinds(conn.events()) == ["HandshakeRequested"]
    refused(upgrade_request("/ws/room1/x"), 404, path=pattern)


@pytest.mark.parametrize(
    "origin",
    [
        "null",
        "https://app.example.com.evil.net",
        "http://app.example.com",  # wrong scheme
        "https://app.example.com:8443",  # foreign port
        "https://evil.example",
    ],
)
def test_foreign_origins_get_403(origin: str) -> None:
    response = refused(upgrade_request(origin=origin), 403, allowed_origins=[APP])
    assert b"origin not allowed" in response


def test_allowed_origins() -> None:
    ok = serve(upgrade_request(origin="HTTPS://App.Example.com/"), allowed_origins=[APP + "/"])
    assert kinds(ok.events()) == ["HandshakeRequested"]
    # A list without "" refuses clients that send no Origin at all.
    refused(upgrade_request(), 403, allowed_origins=[APP])
    assert origin_allowed(None, "h", ["", APP])
    assert origin_allowed("https://anything", "h", ["*"])
    # Default (None): non-browser clients and same-origin pages only.
    assert origin_allowed(None, "chat.example.com", None)
    assert origin_allowed("https://chat.example.com", "chat.example.com", None)
    assert origin_allowed("http://localhost:8000", "LOCALHOST:8000", None)
    assert not origin_allowed("https://chat.example.com", None, None)
    assert not origin_allowed("null", "chat.example.com", None)
    assert not origin_allowed("ftp://chat.example.com", "chat.example.com", None)
    assert not origin_allowed("https://evil.example", "chat.example.com", None)
    refused(upgrade_request(origin="https://evil.example"), 403)


def test_unsupported_version_is_426_naming_version_13() -> None:
    response = refused(upgrade_request(version="8"), 426)
    assert header_of(response, "sec-websocket-version") == "13"
    refused(upgrade_request(version=None), 426)


@pytest.mark.parametrize("key", [None, "", "not base64!", "c2hvcnQ=", KEY + "AAAA"])
def test_missing_or_malformed_key_is_400(key: str | None) -> None:
    refused(upgrade_request(key=key), 400)


def test_non_get_upgrade_is_405() -> None:
    response = refused(upgrade_request(method="POST", extra=[("Content-Length", "0")]), 405)
    assert header_of(response, "allow") == "GET"


def test_oversized_heads_are_431() -> None:
    # Complete but too large, and still incomplete past the limit: both refused at once.
    refused(upgrade_request(extra=[("X-Big", "a" * 9000)]), 431)
    conn = serve(b"GET /ws HTTP/1.1\r\nX-Big: " + b"a" * 9000)
    assert status_of(conn.data_to_send()) == 431
    many = [(f"X-H{i}", "v") for i in range(101)]
    response = refused(upgrade_request(extra=many), 431)
    assert b"too many request headers" in response
    refused(upgrade_request(extra=[("X-H", "v")] * 5), 431, limits=ConnLimits(max_headers=8))


def test_malformed_http_is_400() -> None:
    refused(b"NOT HTTP AT ALL\r\n\r\n", 400)
    refused(b"GET /ws HTTP/1.1\r\n\r\n", 400)  # HTTP/1.1 without Host


def test_an_http_10_upgrade_without_host_is_refused_at_accept() -> None:
    # Our checks pass, wsproto's do not: the client still gets a clean 400.
    request = upgrade_request(host=None).replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    conn = serve(request)
    assert kinds(conn.events()) == ["HandshakeRequested"]
    conn.accept(Identity("alice"), 0.0)
    assert status_of(conn.data_to_send()) == 400
    assert conn.closed and conn.peer is None


def test_plain_http_requests_are_handed_to_the_application() -> None:
    conn = serve(b"GET /index.html?x=1 HTTP/1.1\r\nHost: h\r\n\r\n")
    (event,) = conn.events()
    assert isinstance(event, HttpRequested)
    assert event.method == "GET" and event.request.path == "/index.html"
    assert event.request.query == {"x": "1"}
    conn.respond(200, b"<h1>hi</h1>", [("Cache-Control", "no-store")], content_type="text/html")
    response = conn.data_to_send()
    assert status_of(response) == 200 and response.endswith(b"<h1>hi</h1>")
    assert header_of(response, "content-type") == "text/html"
    assert header_of(response, "content-length") == "11"
    assert kinds(conn.events()) == ["Closed"]
    with pytest.raises(LocalProtocolError):
        conn.respond(200, b"")
    # A WebSocket path without the upgrade headers is a plain request too.
    other = serve(upgrade_request(upgrade=None, connection="keep-alive"))
    assert kinds(other.events()) == ["HttpRequested"]
    other.respond(426, b"", [("Content-Type", "text/plain")])
    assert header_of(other.data_to_send(), "content-type") == "text/plain"


def test_bytes_while_the_decision_is_pending_are_kept_then_bounded() -> None:
    limits = ConnLimits(max_header_bytes=1024, max_message_size=1024)
    conn = serve(upgrade_request(), limits=limits)
    conn.receive_data(b"x" * 1000, 0.0)
    assert not conn.closed
    conn.receive_data(b"x" * 2000, 0.0)
    (event,) = [e for e in conn.events() if isinstance(e, Closed)]
    assert event.code == 1006 and "before the handshake was decided" in event.reason


def test_connection_lost_or_timed_out_before_the_handshake() -> None:
    conn = ServerConn(now=0.0)
    conn.receive_data(b"GET /ws HT", 0.0)
    conn.receive_data(None, 1.0)
    assert conn.events() == [Closed(1006, "connection lost before the handshake", True)]
    conn.receive_data(b"more", 2.0)  # ignored once closed
    assert conn.events() == [] and conn.next_deadline() is None
    slow = ServerConn(now=5.0, limits=ConnLimits(handshake_timeout=10.0))
    slow.receive_data(b"GET /ws HTTP/1.1\r\n", 6.0)  # slowloris
    assert slow.next_deadline() == 15.0
    slow.handle_timeout(14.9)
    assert not slow.closed
    slow.handle_timeout(15.0)
    assert slow.events() == [Closed(1006, "handshake timeout")]
    assert slow.data_to_send() == b""
    forever = ServerConn(now=0.0, limits=ConnLimits(handshake_timeout=None))
    assert forever.next_deadline() is None
    forever.handle_timeout(1e9)
    assert not forever.closed


def test_close_during_the_handshake_ends_at_once() -> None:
    conn = serve(upgrade_request())
    conn.events()
    conn.close(1001, "shutting down", 0.0)
    assert conn.events() == [Closed(1001, "shutting down")]
    with pytest.raises(LocalProtocolError, match="cannot send"):
        conn.send("x", 1, 0.0)


# ---------------------------------------------------------------------- client
def client_and_server(**client_kw: object) -> tuple[ClientConn, ServerConn]:
    client = ClientConn(host="chat.example.com", target="/ws?token=t", now=0.0, **client_kw)  # type: ignore[arg-type]
    server = ServerConn(now=0.0)
    server.receive_data(client.data_to_send(), 0.0)
    return client, server


def test_client_sends_the_upgrade_at_once_with_its_headers() -> None:
    client = ClientConn(
        host="h", target="/ws?x=1", now=0.0, headers=[("Authorization", "Bearer t")]
    )
    request = client.data_to_send()
    assert request.startswith(b"GET /ws?x=1 HTTP/1.1\r\n")
    assert b"Authorization: Bearer t\r\n" in request
    assert client.state is ConnState.HANDSHAKE


@pytest.mark.parametrize("mode", list(AckMode))
def test_client_learns_the_ack_mode_from_the_response_header(mode: AckMode) -> None:
    client, server = client_and_server()
    server.accept(Identity("alice"), 0.0, options=PeerOptions(ack_mode=mode))
    client.receive_data(server.data_to_send(), 0.0)
    (event,) = client.events()
    assert isinstance(event, Connected) and (ACK_MODE_HEADER, mode.value) in event.headers
    assert client.ack_mode is mode and client.state is ConnState.OPEN
    assert client.peer is not None and client.peer.sender.mode is mode


def test_client_falls_back_to_its_own_mode_or_uses_the_one_it_was_given() -> None:
    # A server that does not say (easy-chat): the client's options decide.
    client, server = client_and_server(options=PeerOptions(ack_mode=AckMode.RIGOR))
    server.accept(Identity("alice"), 0.0, headers=[(ACK_MODE_HEADER + "-x", "1")])
    response = server.data_to_send().replace(b"imkit-ack-mode: only", b"imkit-ack-mode: bogus")
    client.receive_data(response, 0.0)
    assert client.ack_mode is AckMode.RIGOR
    fixed, server = client_and_server(ack_mode=AckMode.NONE)
    server.accept(Identity("alice"), 0.0)
    fixed.receive_data(server.data_to_send(), 0.0)
    assert fixed.ack_mode is AckMode.NONE


def test_client_sees_a_refusal_with_its_status_and_body() -> None:
    client, server = client_and_server()
    server.reject(401, "bad token")
    client.receive_data(server.data_to_send(), 0.0)
    rejected, closed = client.events()
    assert isinstance(rejected, Rejected) and rejected.status == 401
    assert rejected.body == b"bad token\n"
    assert ("content-type", "text/plain; charset=utf-8") in rejected.headers
    assert isinstance(closed, Closed) and closed.code == 1006 and closed.by_peer
    client.receive_data(b"late", 0.0)  # ignored
    assert client.events() == []


def test_client_refusal_whose_body_ends_with_the_connection() -> None:
    # Bug found: a refusal without Content-Length (body until EOF) was reported only as
    # "connection lost": the client never learnt the status.
    client = ClientConn(host="h", target="/ws", now=0.0)
    client.receive_data(b"HTTP/1.1 403 Forbidden\r\nConnection: close\r\n\r\nno ", 0.0)
    client.receive_data(b"entry", 0.0)
    assert client.events() == []
    client.receive_data(None, 0.0)
    rejected, closed = client.events()
    assert rejected == Rejected(403, [("connection", "close")], b"no entry")
    assert closed == Closed(1006, "HTTP 403", True)


def test_client_refusal_without_a_body() -> None:
    client = ClientConn(host="h", target="/ws", now=0.0)
    client.receive_data(b"HTTP/1.1 103 Early Hints\r\n\r\n", 0.0)
    rejected, _closed = client.events()
    assert isinstance(rejected, Rejected) and rejected.status == 103 and rejected.body == b""


def test_client_bad_response_or_lost_connection() -> None:
    client = ClientConn(host="h", target="/ws", now=0.0)
    client.receive_data(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: wrong\r\n\r\n",
        0.0,
    )
    (closed,) = client.events()
    assert isinstance(closed, Closed) and closed.code == 1006
    assert closed.reason.startswith("bad handshake response")
    lost = ClientConn(host="h", target="/ws", now=0.0)
    lost.receive_data(None, 0.0)
    assert lost.events() == [Closed(1006, "connection lost during the handshake", True)]
    slow = ClientConn(host="h", target="/ws", now=0.0, limits=ConnLimits(handshake_timeout=3))
    slow.handle_timeout(3.0)
    assert slow.events() == [Closed(1006, "handshake timeout")]


def test_client_trailing_frames_after_the_101_are_read() -> None:
    client, server = client_and_server()
    server.accept(Identity("alice"), 0.0)
    server.send("welcome", {"hi": 1}, 0.0)
    client.receive_data(server.data_to_send(), 0.0)  # 101 and the push in one read
    connected, received = client.events()
    assert isinstance(connected, Connected)
    assert received.frame.method == "welcome"  # type: ignore[union-attr]


def test_client_reconnect_resends_with_the_same_ids() -> None:
    sender, receiver = Sender(AckMode.ONLY), Receiver(AckMode.ONLY)
    factories = {"sender_factory": lambda mode: sender, "receiver_factory": lambda mode: receiver}
    first, server = client_and_server(**factories)
    server.accept(Identity("alice"), 0.0)
    first.receive_data(server.data_to_send(), 0.0)
    frame = first.send("chat", 1, 0.0)  # never reaches the server
    first.receive_data(None, 1.0)
    # The client keeps its unacknowledged messages: no DeliveryFailed, just Closed.
    assert kinds(first.events()) == ["Connected", "Closed"]
    second, server = client_and_server(**factories)
    server.accept(Identity("alice"), 2.0)
    second.receive_data(server.data_to_send(), 2.0)
    server.receive_data(second.data_to_send(), 2.0)
    received = [e for e in server.events() if type(e).__name__ == "MessageReceived"]
    assert [e.frame.id for e in received] == [frame.id]  # type: ignore[union-attr]
    second.receive_data(server.data_to_send(), 2.0)
    assert kinds(second.events()) == ["Connected", "Delivered"]


def test_accept_selects_an_offered_subprotocol() -> None:
    # A browser that offered subprotocols (here a token) fails the connection unless the
    # server selects one of them.
    conn = serve(upgrade_request(extra=[("Sec-WebSocket-Protocol", "token.abc, chat")]))
    with pytest.raises(LocalProtocolError, match="did not offer"):
        conn.accept(Identity("alice"), 0.0, subprotocol="other")
    assert conn.state is ConnState.HANDSHAKE
    conn.accept(Identity("alice"), 0.0, subprotocol="token.abc")
    assert header_of(conn.data_to_send(), "sec-websocket-protocol") == "token.abc"


def test_client_refusal_followed_by_garbage_in_the_same_read() -> None:
    # Bug found by fuzzing: wsproto raised on the garbage after a complete refusal, and
    # the refusal it had already parsed was dropped: the client saw only "bad response".
    client = ClientConn(host="h", target="/ws", now=0.0)
    client.receive_data(b"HTTP/1.1 103 Early Hints\r\n\r\n\x00garbage", 0.0)
    rejected, closed = client.events()
    assert isinstance(rejected, Rejected) and rejected.status == 103
    assert closed == Closed(1006, "HTTP 103", True)
    # A body cut short by a framing error: the status and the body so far are kept.
    chunked = ClientConn(host="h", target="/ws", now=0.0)
    chunked.receive_data(
        b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nno!\r\nzz\r\n", 0.0
    )
    rejected, closed = chunked.events()
    assert rejected == Rejected(403, [("transfer-encoding", "chunked")], b"no!")
    assert closed.code == 1006  # type: ignore[union-attr]
