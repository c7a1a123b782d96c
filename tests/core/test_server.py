"""App configuration, routes, the user registry, and the single-node Discover."""

from __future__ import annotations

import math
import sys
import types
from typing import Any

import pytest

from imkit.core.ack import AckMode, AckTimers
from imkit.core.conn import ConnLimits
from imkit.core.frames import Frame
from imkit.core.interfaces import (
    Authentication,
    Binding,
    Discover,
    Forward,
    HandshakeRequest,
    Identity,
    SingleNode,
)
from imkit.core.peer import PeerOptions
from imkit.core.routing import Route, Router
from imkit.core.server import App, HttpResponse, LoginPolicy, Registry
from imkit.exceptions import ConfigurationError

from .helpers import run_sync


class Auth:
    async def authenticate(self, request: HandshakeRequest) -> Identity:
        return Identity("u")


async def handler(ctx: Any) -> None:
    return None


# ---------------------------------------------------------------------- routing
def test_router_registers_and_looks_up_routes() -> None:
    router = Router()

    @router.route("conversation.chat")
    async def chat(ctx: Any) -> None:
        return None

    assert router.get("conversation.chat") == Route("conversation.chat", chat)
    assert router.get("nope") is None
    assert "conversation.chat" in router and "nope" not in router and 5 not in router
    assert [r.method for r in router] == ["conversation.chat"] and len(router) == 1


def test_router_contains_follows_later_routes() -> None:
    router = Router()
    contains = router.contains  # taken once, as a connection does
    assert not contains("late")

    @router.route("late")
    async def late(ctx: Any) -> None:
        return None

    assert contains("late") and not contains("nope") and not contains(5)


class AsyncCallable:
    async def __call__(self, ctx: Any) -> None:
        return None


def test_async_callable_objects_are_handlers() -> None:
    router = Router()
    router.add("obj", AsyncCallable())
    assert "obj" in router


@pytest.mark.parametrize("method", ["", " chat", "chat\n", None, 3])
def test_route_names_are_validated(method: Any) -> None:
    with pytest.raises(ConfigurationError, match="non-empty method"):
        Router().add(method, handler)


def test_duplicate_and_sync_handlers_are_refused() -> None:
    router = Router()
    router.add("m", handler)
    with pytest.raises(ConfigurationError, match="already has a route"):
        router.add("m", handler)
    with pytest.raises(ConfigurationError, match="async function"):
        router.add("sync", lambda ctx: None)


def test_a_frozen_router_cannot_change() -> None:
    router = Router()
    assert not router.frozen
    router.freeze()
    assert router.frozen
    with pytest.raises(ConfigurationError, match="cannot change"):
        router.add("m", handler)


# ---------------------------------------------------------------------- app
def test_app_defaults_and_options() -> None:
    app = App(auth=Auth())
    assert app.ack_mode is AckMode.ONLY and app.login_policy is LoginPolicy.SINGLE
    assert app.path == "/ws" and app.allowed_origins is None
    assert isinstance(app.discover, SingleNode) and app.limits == ConnLimits()
    assert app.options.ack_mode is AckMode.ONLY and app.logger.name == "imkit.server"
    timers = AckTimers(resend_interval=1.0)
    tuned = App(
        auth=Auth(),
        ack_mode="rigor",
        login_policy="multi",
        allowed_origins=["https://a"],
        options=PeerOptions(max_strikes=3),
        timers=timers,
    )
    # The app's ack mode and timers win over those in the options it was given.
    assert tuned.options.ack_mode is AckMode.RIGOR and tuned.options.timers == timers
    assert tuned.options.max_strikes == 3 and tuned.allowed_origins == ("https://a",)
    assert tuned.login_policy is LoginPolicy.MULTI


def test_app_refuses_bad_configuration() -> None:
    with pytest.raises(ConfigurationError, match="Authentication"):
        App(auth=object())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="max_concurrent_handlers"):
        App(auth=Auth(), max_concurrent_handlers=0)
    with pytest.raises(ConfigurationError, match="max_concurrent_handshakes"):
        App(auth=Auth(), max_concurrent_handshakes=0)
    for interval in (0, -1.0, math.nan):
        with pytest.raises(ConfigurationError, match="revalidate_interval"):
            App(auth=Auth(), revalidate_interval=interval)
    with pytest.raises(ValueError):
        App(auth=Auth(), ack_mode="sometimes")


def test_app_decorators_register_routes_pages_and_hooks() -> None:
    app = App(auth=Auth())

    @app.route("m")
    async def route(ctx: Any) -> None:
        return None

    @app.page("/")
    async def index(request: HandshakeRequest) -> HttpResponse:
        return HttpResponse(body=b"hi")

    with pytest.raises(ConfigurationError, match="already has a page"):
        app.page("/")(index)

    async def hook(*args: Any) -> None:
        return None

    for register, hooks in [
        (app.on_connect, app.connect_hooks),
        (app.on_disconnect, app.disconnect_hooks),
        (app.on_delivered, app.delivered_hooks),
        (app.on_delivery_failed, app.failed_hooks),
        (app.on_startup, app.startup_hooks),
        (app.on_shutdown, app.shutdown_hooks),
    ]:
        assert register(hook) is hook and hooks == [hook]  # type: ignore[operator]
    assert app.router.get("m") is not None and app.pages == {"/": index}
    response = run_sync(index(HandshakeRequest("/")))
    assert response == HttpResponse(200, b"hi", "text/plain; charset=utf-8", ())


def test_app_run_hands_over_to_the_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    # The core never imports a transport at import time; run() does, on demand.
    calls: list[tuple[Any, ...]] = []
    fake = types.ModuleType("imkit.transport.server")
    fake.run = lambda app, **kw: calls.append((app, kw))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "imkit.transport.server", fake)
    app = App(auth=Auth())
    app.run("0.0.0.0", 9000, reload=False)
    assert calls == [(app, {"host": "0.0.0.0", "port": 9000, "reload": False})]


# ---------------------------------------------------------------------- registry
def test_single_policy_replaces_the_old_connection() -> None:
    registry: Registry[str] = Registry()
    alice = Identity("alice", device_id="phone")
    assert registry.add(alice, "e1", "conn1") == []
    # A second login (any device) displaces the first: the caller closes it (4000).
    assert registry.add(Identity("alice", device_id="laptop"), "e2", "conn2") == ["conn1"]
    assert registry.connections("alice") == ["conn2"] and registry.count("alice") == 1
    # The old connection closes late: it must not remove the new one.
    assert registry.remove("alice", "e1") is False
    assert registry.connections("alice") == ["conn2"] and registry.is_online("alice")
    assert registry.remove("alice", "e2") is True
    assert not registry.is_online("alice") and registry.connections("alice") == []
    assert registry.remove("alice", "e2") is False and registry.remove("nobody", "x") is False


def test_multi_policy_keeps_one_connection_per_device() -> None:
    registry: Registry[str] = Registry("multi")
    assert registry.policy is LoginPolicy.MULTI
    registry.add(Identity("alice", device_id="phone"), "e1", "phone1")
    assert registry.add(Identity("alice", device_id="laptop"), "e2", "laptop1") == []
    assert registry.add(Identity("alice", device_id="phone"), "e3", "phone2") == ["phone1"]
    registry.add(Identity("bob"), "e4", "bob1")
    assert sorted(registry.connections("alice")) == ["laptop1", "phone2"]
    assert len(registry) == 3 and sorted(registry.all()) == ["bob1", "laptop1", "phone2"]
    assert registry.remove("alice", "e2") and registry.count("alice") == 1
    # live(): the same connections as a tuple that later changes do not touch.
    live = registry.live("alice")
    assert live == ("phone2",) and registry.live("nobody") == ()
    registry.add(Identity("alice", device_id="tablet"), "e5", "tablet1")
    assert live == ("phone2",) and registry.live("alice") == ("phone2", "tablet1")
    assert registry.remove("alice", "e3") and registry.live("alice") == ("tablet1",)
    assert registry.remove("alice", "e5") and registry.live("alice") == ()


def test_an_epoch_is_registered_once() -> None:
    registry: Registry[str] = Registry("multi")
    registry.add(Identity("alice", device_id="a"), "e1", "c1")
    with pytest.raises(ConfigurationError, match="already registered"):
        registry.add(Identity("alice", device_id="b"), "e1", "c2")


def test_receiver_is_kept_across_reconnects_then_pruned() -> None:
    registry: Registry[str] = Registry()
    timers = AckTimers(ack_timeout=10.0, remember_for=40.0)
    alice = Identity("alice")
    first = registry.receiver(alice, AckMode.ONLY, timers, 0.0)
    registry.release_receiver(alice, 5.0)
    # Reconnecting within remember_for: the same dedupe memory.
    assert registry.receiver(alice, AckMode.ONLY, timers, 30.0) is first
    registry.release_receiver(alice, 31.0)
    registry.release_receiver(alice, 31.0)  # never below zero connections
    other = registry.receiver(Identity("alice", device_id="d2"), AckMode.ONLY, timers, 40.0)
    assert other is not first  # each device has its own
    # Long after the last connection closed, the receiver is dropped.
    fresh = registry.receiver(alice, AckMode.ONLY, timers, 100.0)
    assert fresh is not first
    # A receiver in use is never pruned, however old; another mode gets a new one.
    assert registry.receiver(alice, AckMode.ONLY, timers, 1000.0) is fresh
    assert registry.receiver(alice, AckMode.RIGOR, timers, 1000.0).mode is AckMode.RIGOR
    registry.release_receiver(Identity("nobody"), 0.0)  # unknown: nothing to do


def test_a_forgotten_receiver_hands_over_what_waited_for_a_confirmation() -> None:
    """Alice's RigorAck message m1 is acked but never confirmed (her connection closed);
    m2 was confirmed and dispatched. When her receiver is forgotten, m1 goes with it:
    take_forgotten() says so once, with her ids; an OnlyAck receiver leaves nothing."""
    registry: Registry[str] = Registry("multi")
    timers = AckTimers(ack_timeout=10.0, remember_for=40.0)
    alice, bob = Identity("alice", device_id="phone"), Identity("bob")
    receiver = registry.receiver(alice, AckMode.RIGOR, timers, 0.0)
    m1, m2 = Frame(id="m1", method="say"), Frame(id="m2", method="say")
    receiver.on_data(m1, 1.0)
    receiver.on_data(m2, 1.0)
    receiver.on_confirm("m2", 2.0)
    registry.release_receiver(alice, 3.0)
    registry.release_receiver(bob, 3.0)  # (never had one)
    only = registry.receiver(bob, AckMode.ONLY, timers, 4.0)
    only.on_data(Frame(id="b1", method="say"), 4.0)
    registry.release_receiver(bob, 5.0)
    assert registry.take_forgotten() == []
    assert registry.receiver(Identity("carol"), AckMode.RIGOR, timers, 50.0) is not receiver
    assert registry.take_forgotten() == [("alice", "phone", m1)]
    assert registry.take_forgotten() == []


def test_pruning_is_throttled() -> None:
    registry: Registry[str] = Registry()
    timers = AckTimers(ack_timeout=10.0, remember_for=40.0)
    alice = Identity("alice")
    first = registry.receiver(alice, AckMode.ONLY, timers, 100.0)  # next prune at 110
    registry.release_receiver(alice, 0.0)
    # Stale (idle since 0) but the last prune ran less than remember_for / 4 ago.
    assert registry.receiver(Identity("bob"), AckMode.ONLY, timers, 105.0) is not first
    assert registry.receiver(alice, AckMode.ONLY, timers, 106.0) is first


# ---------------------------------------------------------------------- interfaces
def test_handshake_request_headers() -> None:
    request = HandshakeRequest("/ws", headers=[("a", "1"), ("a", "2")])
    assert request.header("A") == "1" and request.header("b") is None
    assert request.query == {} and request.subprotocols == ()


def test_single_node_discover() -> None:
    node = SingleNode()
    assert isinstance(node, Discover) and node.node_id == "local"
    assert SingleNode("n2").node_id == "n2"
    binding = Binding("alice", "local", "e1")

    async def on_forward(message: Forward) -> None:
        return None

    assert run_sync(node.start(on_forward)) is None
    assert run_sync(node.bind(binding)) == []
    assert run_sync(node.unbind(binding)) is None
    assert run_sync(node.locate(["alice"])) == {}
    with pytest.raises(LookupError, match="no node 'n2'"):
        run_sync(node.forward("n2", Forward("push", "alice", "local", Frame())))
    assert run_sync(node.stop()) is None


def test_protocols_are_runtime_checkable() -> None:
    assert isinstance(Auth(), Authentication)
    assert not isinstance(object(), Authentication)
    assert Identity("u").expires_at is None and Identity("u").claims == {}
