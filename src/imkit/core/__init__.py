"""imkit's sans-IO core: frames, ack state machines, connections, routing, the registry.

Nothing here does I/O, starts a task or reads a clock: bytes and the time come in as
arguments, bytes and events go out as values. Any event loop can drive it; imkit's own
transports (:mod:`imkit.transport`) are one such driver.
"""

from __future__ import annotations

from imkit.core.ack import AckMode, AckTimers, Receiver, Sender
from imkit.core.conn import ClientConn, ConnLimits, ConnState, ServerConn
from imkit.core.events import (
    Closed,
    Connected,
    Delivered,
    DeliveryFailed,
    ErrorReceived,
    Event,
    HandshakeRequested,
    HttpRequested,
    MessageExpired,
    MessageReceived,
    Rejected,
)
from imkit.core.frames import (
    DecodeError,
    ErrorCode,
    Frame,
    FrameType,
    decode_frame,
    encode_frame,
    error_frame,
)
from imkit.core.interfaces import (
    Authentication,
    Binding,
    Discover,
    Forward,
    HandshakeRequest,
    Identity,
    SingleNode,
)
from imkit.core.peer import Peer, PeerOptions
from imkit.core.routing import Route, Router
from imkit.core.server import (
    App,
    Context,
    HttpResponse,
    LoginPolicy,
    Registry,
    ServerAPI,
    Session,
)

__all__ = (
    "AckMode",
    "AckTimers",
    "App",
    "Authentication",
    "Binding",
    "ClientConn",
    "Closed",
    "ConnLimits",
    "ConnState",
    "Connected",
    "Context",
    "DecodeError",
    "Delivered",
    "DeliveryFailed",
    "Discover",
    "ErrorCode",
    "ErrorReceived",
    "Event",
    "Forward",
    "Frame",
    "FrameType",
    "HandshakeRequest",
    "HandshakeRequested",
    "HttpRequested",
    "HttpResponse",
    "Identity",
    "LoginPolicy",
    "MessageExpired",
    "MessageReceived",
    "Peer",
    "PeerOptions",
    "Receiver",
    "Registry",
    "Rejected",
    "Route",
    "Router",
    "Sender",
    "ServerAPI",
    "ServerConn",
    "Session",
    "SingleNode",
    "decode_frame",
    "encode_frame",
    "error_frame",
)
