"""The protocols an application plugs into imkit: who a user is, and where a user is.

* :class:`Authentication` decides a handshake: it turns a :class:`HandshakeRequest` into an
  :class:`Identity` or raises :class:`~imkit.exceptions.AuthenticationFailed`, which the
  client receives as an HTTP 401/403 response *before* any upgrade.
* :class:`Discover` finds users on other nodes and forwards frames to them. The default,
  :class:`SingleNode`, knows only this process.

Both are :class:`typing.Protocol` classes: any object with these methods works.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import attrs

from imkit.core.frames import Frame

__all__ = (
    "Authentication",
    "Binding",
    "Discover",
    "Forward",
    "HandshakeRequest",
    "Identity",
    "SingleNode",
)


@attrs.frozen(slots=True)
class HandshakeRequest:
    """What a client sent to open a WebSocket: path, query, headers and its address.

    ``headers`` keep their order and lower-cased names; ``query`` maps each query
    parameter to its first value.
    """

    path: str
    query: Mapping[str, str] = attrs.field(factory=dict)
    headers: Sequence[tuple[str, str]] = ()
    remote_addr: str = ""
    subprotocols: Sequence[str] = ()

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first value of header ``name`` (case-insensitive), or ``default``."""
        lname = name.lower()
        for key, value in self.headers:
            if key == lname:
                return value
        return default


@attrs.frozen(slots=True)
class Identity:
    """Who is on a connection, as decided by an :class:`Authentication`.

    ``device_id`` tells apart the devices of one user under the "multi" login policy.
    ``expires_at`` (seconds since the epoch, wall clock) closes the connection with 1008
    when the credential expires while it is open; ``None`` means never.
    """

    user_id: str
    device_id: str = ""
    expires_at: float | None = None
    claims: Mapping[str, Any] = attrs.field(factory=dict)


@runtime_checkable
class Authentication(Protocol):
    """Decides who opens a connection.

    Raise :class:`~imkit.exceptions.AuthenticationFailed` to refuse; the client gets its
    ``status`` (401 or 403) as the HTTP answer to the upgrade request.
    """

    async def authenticate(self, request: HandshakeRequest) -> Identity:
        """Return the identity behind ``request`` or raise ``AuthenticationFailed``."""
        ...


@attrs.frozen(slots=True)
class Binding:
    """One connection of a user, as the cluster knows it.

    ``epoch`` is unique per connection (never reused), so that the late close of an old
    connection can only remove its own binding, never the user's newer one.
    """

    user_id: str
    node_id: str
    epoch: str
    device_id: str = ""


@attrs.frozen(slots=True)
class Forward:
    """A message from one node to another.

    ``kind`` is ``"push"`` (deliver ``frame`` to ``user_id``'s connections on the receiving
    node, with that node's downstream acks) or ``"kick"`` (close the connection with
    ``epoch``: the user logged in elsewhere under the "single" policy).
    """

    kind: str
    user_id: str
    origin_node: str
    frame: Frame | None = None
    epoch: str = ""


ForwardHandler = Callable[[Forward], Awaitable[None]]


@runtime_checkable
class Discover(Protocol):
    """Where users are connected, across the nodes of a cluster."""

    @property
    def node_id(self) -> str:
        """This node's id, unique in the cluster."""
        ...

    async def start(self, on_forward: ForwardHandler) -> None:
        """Register this node and start receiving forwards; ``on_forward`` gets each one."""
        ...

    async def stop(self) -> None:
        """Unregister this node and release its users."""
        ...

    async def bind(self, binding: Binding) -> list[Binding]:
        """Record ``binding``; return the user's *other* live bindings (on any node)."""
        ...

    async def unbind(self, binding: Binding) -> None:
        """Remove ``binding`` if, and only if, it is still recorded with the same epoch."""
        ...

    async def locate(self, user_ids: Sequence[str]) -> dict[str, list[Binding]]:
        """The live bindings of each user in ``user_ids`` (users with none are left out)."""
        ...

    async def forward(self, node_id: str, message: Forward) -> None:
        """Send ``message`` to node ``node_id``."""
        ...


class SingleNode:
    """The default :class:`Discover`: one process, no other nodes, nothing to forward."""

    def __init__(self, node_id: str = "local") -> None:
        self._node_id = node_id

    @property
    def node_id(self) -> str:
        """This node's id."""
        return self._node_id

    async def start(self, on_forward: ForwardHandler) -> None:
        """Nothing to start on a single node."""

    async def stop(self) -> None:
        """Nothing to stop on a single node."""

    async def bind(self, binding: Binding) -> list[Binding]:
        """A single node keeps its bindings in the server's registry: no others here."""
        return []

    async def unbind(self, binding: Binding) -> None:
        """Nothing recorded outside the registry."""

    async def locate(self, user_ids: Sequence[str]) -> dict[str, list[Binding]]:
        """No user is on another node."""
        return {}

    async def forward(self, node_id: str, message: Forward) -> None:
        """There is no other node to forward to."""
        raise LookupError(f"no node {node_id!r} on a single-node deployment")
