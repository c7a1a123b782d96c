"""The HTTP side of the opening handshake, sans-IO: read a request head, judge it, answer.

Plain functions of bytes and options, no state: :class:`~imkit.core.conn.ServerConn`
feeds them the bytes it has buffered and acts on the result. A refusal is a
:class:`Refusal` (the HTTP status a client receives before any upgrade), never an
exception.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from http import HTTPStatus
from urllib.parse import parse_qsl, urlsplit

import attrs
import h11

from imkit.core.interfaces import HandshakeRequest

__all__ = (
    "Refusal",
    "check_upgrade",
    "http_response",
    "is_upgrade",
    "origin_allowed",
    "parse_request_head",
    "status_phrase",
)


@attrs.frozen(slots=True)
class Refusal:
    """Why a request is refused: the HTTP ``status``, a short ``reason``, extra headers."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...] = ()


def parse_request_head(
    head: bytes, *, remote_addr: str, max_header_bytes: int, max_headers: int
) -> tuple[str, HandshakeRequest] | Refusal | None:
    """Read the request at the start of ``head``: ``(method, request)``, a refusal (400,
    431), or ``None`` when the head is not complete yet.
    """
    end = head.find(b"\r\n\r\n")
    if end < 0:
        return Refusal(431, "request head too large") if len(head) > max_header_bytes else None
    if end + 4 > max_header_bytes:
        return Refusal(431, "request head too large")
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
    parser.receive_data(head[: end + 4])
    try:
        event = parser.next_event()
    except h11.RemoteProtocolError as exc:
        return Refusal(exc.error_status_hint, f"bad request: {exc}")
    if not isinstance(event, h11.Request):  # pragma: no cover - a full head always parses
        return Refusal(400, "bad request")
    if len(event.headers) > max_headers:
        return Refusal(431, "too many request headers")
    headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in event.headers]
    split = urlsplit(event.target.decode("latin-1"))
    request = HandshakeRequest(
        path=split.path,
        query=dict(reversed(parse_qsl(split.query, keep_blank_values=True))),
        headers=headers,
        remote_addr=remote_addr,
        subprotocols=[
            p.strip()
            for name, value in headers
            if name == "sec-websocket-protocol"
            for p in value.split(",")
            if p.strip()
        ],
    )
    return event.method.decode("latin-1"), request


def is_upgrade(request: HandshakeRequest) -> bool:
    """Whether ``request`` asks for a WebSocket (``Upgrade: websocket``, ``Connection:
    upgrade``); anything else is a plain HTTP request.
    """
    upgrade = (request.header("upgrade") or "").lower()
    connection = {t.strip().lower() for t in (request.header("connection") or "").split(",")}
    return upgrade == "websocket" and "upgrade" in connection


def check_upgrade(
    method: str,
    request: HandshakeRequest,
    *,
    path_ok: Callable[[str], bool],
    allowed_origins: Sequence[str] | None,
) -> Refusal | None:
    """Why an upgrade request must be refused (405, 404, 426, 400, 403), or ``None``."""
    if method != "GET":
        return Refusal(405, "WebSocket upgrades must use GET", (("Allow", "GET"),))
    if not path_ok(request.path):
        return Refusal(404, "no WebSocket endpoint at this path")
    if request.header("sec-websocket-version") != "13":
        return Refusal(426, "unsupported WebSocket version", (("Sec-WebSocket-Version", "13"),))
    try:
        key = base64.b64decode(request.header("sec-websocket-key") or "", validate=True)
    except binascii.Error:
        key = b""
    if len(key) != 16:
        return Refusal(400, "missing or malformed Sec-WebSocket-Key")
    if not origin_allowed(request.header("origin"), request.header("host"), allowed_origins):
        return Refusal(403, "origin not allowed")
    return None


def origin_allowed(origin: str | None, host: str | None, allowed: Sequence[str] | None) -> bool:
    """Whether a browser ``Origin`` may open a connection.

    ``allowed=None`` admits requests without an Origin (non-browser clients) and
    same-origin pages (the Origin's host equals the Host header); a list admits exactly
    the origins listed (``scheme://host[:port]``, case-insensitive), and ``"*"`` admits all.
    """
    if allowed is not None and "*" in allowed:
        return True
    if origin is None:
        return allowed is None or "" in allowed
    origin = origin.strip().lower().rstrip("/")
    if allowed is None:
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.netloc == (host or "").lower() != ""
    return origin in {o.strip().lower().rstrip("/") for o in allowed}


def status_phrase(status: int) -> str:
    """The reason phrase of ``status`` ("Error" for a code HTTP does not name)."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def http_response(
    status: int, body: bytes, headers: Sequence[tuple[str, str]] = (), content_type: str = ""
) -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    lines = [f"HTTP/1.1 {status} {status_phrase(status)}"]
    names = {name.lower() for name, _ in headers}
    if "content-type" not in names:
        lines.append(f"Content-Type: {content_type or 'text/plain; charset=utf-8'}")
    lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    lines.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
