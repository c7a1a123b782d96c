"""Time-driven closes on a FakeClock, with no real waiting: credential expiry (1008),
idle timeout (1000), keepalive ping timeout (1011)."""

from __future__ import annotations

import anyio
import pytest
from tests.transport.helpers import SECRET, RawWS, RevocableAuth, make_app

import imkit
from imkit.testing import FakeClock, MemoryServer

pytestmark = pytest.mark.anyio


class ExpiringAuth:
    """Admits everyone with a credential that expires ``ttl`` seconds from now (wall)."""

    def __init__(self, clock: FakeClock, ttl: float) -> None:
        self.clock = clock
        self.ttl = ttl

    async def authenticate(self, request: imkit.HandshakeRequest) -> imkit.Identity:
        user = request.query.get("userId", "anon")
        return imkit.Identity(user, expires_at=self.clock.wall() + self.ttl)


async def test_token_expiry_closes_1008_credential_expired() -> None:
    clock = FakeClock()
    app, _seen = make_app(auth=imkit.TokenAuth(SECRET, clock=clock.wall))
    token = imkit.mint_token(SECRET, "alice", ttl=60, now=clock.wall())
    with anyio.fail_after(10):
        async with MemoryServer(app, clock=clock) as server:
            async with server.connect(token=token) as client:
                await clock.advance_by(59)
                assert await client.request("echo", "t=59") == "t=59"
                await clock.advance_by(2)
                with pytest.raises(imkit.ConnectionClosed) as closed:
                    await client.receive()
                assert (closed.value.code, closed.value.reason) == (1008, "credential expired")
                assert client.connections == 1  # 1008: the client does not reconnect
            # The same token is refused at the handshake now: 401, not an upgrade.
            with pytest.raises(imkit.HandshakeRejected) as refused:
                async with server.connect(token=token):
                    pass
            assert refused.value.status == 401


@pytest.mark.parametrize("ttl", [-1.0, 0.0])
async def test_identity_already_expired_closes_at_once(ttl: float) -> None:
    clock = FakeClock()
    app, seen = make_app(auth=ExpiringAuth(clock, ttl))
    with anyio.fail_after(10):
        async with MemoryServer(app, clock=clock) as server:
            raw = RawWS(server.open_stream())
            assert await raw.handshake("/ws?userId=late") == 101
            closed = await raw.wait_closed()
            assert (closed.code, closed.reason) == (1008, "credential expired")
    assert not seen.dispatched


async def test_identity_expiring_soon_closes_when_it_expires() -> None:
    clock = FakeClock()
    app, _seen = make_app(auth=ExpiringAuth(clock, 5.0))
    with anyio.fail_after(10):
        async with MemoryServer(app, clock=clock) as server:
            raw = RawWS(server.open_stream())
            assert await raw.handshake("/ws?userId=soon") == 101
            await clock.advance_by(4.9)
            await raw.send_json({"frameType": 3, "id": "n", "method": "echo", "data": 1})
            reply = await raw.recv_json()
            assert reply is not None and reply["data"] == 1
            await clock.advance_by(0.2)
            closed = await raw.wait_closed()
            assert (closed.code, closed.reason) == (1008, "credential expired")


async def test_idle_timeout_on_a_fake_clock() -> None:
    clock = FakeClock()
    app, _seen = make_app(options=imkit.PeerOptions(idle_timeout=30))
    with anyio.fail_after(10):
        async with MemoryServer(app, clock=clock) as server:
            async with server.connect(user_id="idle", keepalive=None, reconnect=False) as client:
                await clock.advance_by(20)
                await client.send("echo", "activity resets the idle timer")
                await client.receive()  # the reply, which is a push to this client
                await clock.advance_by(25)  # 45 s since connecting, 25 since the message
                assert client.connected
                await clock.advance_by(6)
                with pytest.raises(imkit.ConnectionClosed) as closed:
                    await client.receive()
                assert (closed.value.code, closed.value.reason) == (1000, "idle timeout")


async def test_client_keepalive_keeps_an_idle_connection_open() -> None:
    clock = FakeClock()
    app, _seen = make_app(options=imkit.PeerOptions(idle_timeout=30))
    with anyio.fail_after(10):
        async with MemoryServer(app, clock=clock) as server:
            async with server.connect(user_id="busy", keepalive=10) as client:
                await clock.advance_by(100)
                assert client.connected
                assert await client.request("echo", "awake") == "awake"


async def test_keepalive_ping_timeout_closes_1011() -> None:
    clock = FakeClock()
    limits = imkit.ConnLimits(ping_interval=5, ping_timeout=5)
    app, _seen = make_app(limits=limits)
    with anyio.fail_after(10):
        async with MemoryServer(app, clock=clock) as server:
            answering = RawWS(server.open_stream())
            assert await answering.handshake("/ws?userId=alive") == 101
            silent = RawWS(server.open_stream())
            silent.answer_pings = False
            assert await silent.handshake("/ws?userId=dead") == 101

            async with anyio.create_task_group() as tg:
                tg.start_soon(answering.recv_text)  # reads, and answers pings meanwhile
                tg.start_soon(silent.recv_text)
                await clock.advance_by(5)  # the server pings both
                await clock.advance_by(5)  # one pong came back; the other did not
                await clock.advance_by(0)
                closed = await silent.wait_closed()
                tg.cancel_scope.cancel()
            assert (closed.code, closed.reason) == (1011, "keepalive ping timeout")
            assert silent.pings >= 1
            assert answering.closed is None
            assert [s.user_id for s in server.sessions("alive")] == ["alive"]
            assert server.sessions("dead") == []
            await silent.stream.aclose()
            await answering.close()


async def test_revoked_credential_closes_1008_at_the_next_revalidation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    auth = RevocableAuth()
    app, _seen = make_app(auth=auth, revalidate_interval=60)
    with anyio.fail_after(10):
        async with MemoryServer(app, clock=clock) as server:
            async with (
                server.connect(user_id="kept") as kept,
                server.connect(user_id="gone") as gone,
            ):
                assert auth.calls == 2
                # An outage of the auth backend keeps everyone connected.
                auth.broken = True
                await clock.advance_by(60)
                assert auth.calls == 4
                assert kept.connected and gone.connected
                assert "could not revalidate" in caplog.text
                # A revoked credential: closed with 1008 at the next revalidation.
                auth.broken = False
                auth.revoked.add("gone")
                await clock.advance_by(59)
                assert gone.connected
                await clock.advance_by(1)
                with pytest.raises(imkit.ConnectionClosed) as closed:
                    await gone.receive()
                assert (closed.value.code, closed.value.reason) == (1008, "credential revoked")
                assert await kept.request("echo", "still in") == "still in"


async def rate_limited_burst(
    *, count: int, max_strikes: int, step: float, steps: int
) -> tuple[list[int], bool, float, list[int]]:
    """``count`` messages sent at once by one client against 10 msg/s (burst 10, at most
    ``max_strikes``), the fake clock moved ``step`` at a time, ``steps`` times at most:
    the messages acknowledged, whether the client is still connected, the fake time it
    took, and how often the server handled each message."""
    clock = FakeClock()
    options = imkit.PeerOptions(rate_limit=10.0, rate_burst=10, max_strikes=max_strikes)
    app, seen = make_app(options=options)
    with anyio.fail_after(20):
        async with MemoryServer(app, clock=clock) as server:
            async with server.connect(user_id="burst", keepalive=None, reconnect=False) as client:
                done: list[int] = []

                async def send(i: int) -> None:
                    await client.send("count", i, message_id=f"b{i}")
                    done.append(i)

                async with anyio.create_task_group() as tg:
                    for i in range(count):
                        tg.start_soon(send, i)
                    for _ in range(steps):
                        await anyio.wait_all_tasks_blocked()
                        if len(done) == count:
                            break
                        await clock.advance_by(step)
                connected = client.connected
    return sorted(done), connected, clock.now(), sorted(seen.dispatched.values())


async def test_a_burst_over_the_rate_limit_is_slowed_down_not_closed() -> None:
    """A client sends 40 messages at once against 10 msg/s (burst 10, 10 strikes): the
    30 refused come back as ``rate_limited``, one strike for them all (they were sent
    before the client could read the first refusal; it used to be 30 strikes, so 1008);
    its sender resends them, and every message is handled once, with the connection
    still open (30 s of fake time at most, in steps of 0.5 s)."""
    done, connected, _took, handled = await rate_limited_burst(
        count=40, max_strikes=10, step=0.5, steps=60
    )
    assert done == list(range(40)) and connected
    assert handled == [1] * 40


async def test_a_burst_is_resent_at_the_pace_the_rate_limit_asks() -> None:
    """60 messages at once against 10 msg/s (burst 10) and only 3 strikes: the 50
    refused are resent one ``retryAfter`` (0.1 s) apart, each into a freed slot, so the
    first refusal is the only strike. Resent on the resend interval instead (every 2 s,
    all at once), each wave would be over the limit again: strikes 2 and 3, then 1008.
    (8 s of fake time at most, in steps under the 0.1 s between slots.)"""
    done, connected, took, handled = await rate_limited_burst(
        count=60, max_strikes=3, step=0.05, steps=160
    )
    assert done == list(range(60)) and connected
    assert took < 8.0  # paced: about 5 s for the 50 refused
    assert handled == [1] * 60


async def test_requests_one_after_another_keep_to_the_rate_limit_after_a_refusal() -> None:
    """A client that sends 60 requests one after another as fast as they are answered,
    against 10 msg/s (burst 10) and 3 strikes: after the first refusal its messages are
    held for the limit's slots (retryAfter, then one per 1/rate), so that refusal is the
    only strike. Sent as soon as the previous answer came, every message after a wait
    would be over the limit again: one strike per burst, and 1008 on the third."""
    clock = FakeClock()
    options = imkit.PeerOptions(rate_limit=10.0, rate_burst=10, max_strikes=3)
    app, _seen = make_app(options=options)
    with anyio.fail_after(20):
        async with MemoryServer(app, clock=clock) as server:
            async with server.connect(user_id="seq", keepalive=None, reconnect=False) as client:
                done: list[int] = []

                async def send_all() -> None:
                    for i in range(60):
                        assert await client.request("echo", i) == i
                        done.append(i)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(send_all)
                    for _ in range(200):  # 10 s of fake time at most, in steps under 0.1 s
                        await anyio.wait_all_tasks_blocked()
                        if len(done) == 60:
                            break
                        await clock.advance_by(0.05)
                assert done == list(range(60))
                assert client.connected
