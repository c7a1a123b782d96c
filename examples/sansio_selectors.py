"""Drive imkit's sans-IO core from a plain ``selectors`` loop: no anyio, no asyncio, no
threads inside. docs/howto-sansio.md walks through this file.

Run it, then talk to it with any WebSocket client (``imkit chat``, ``websockets``, a
browser)::

    python examples/sansio_selectors.py        # ws://127.0.0.1:8765/ws?user=alice

Routes: ``echo`` answers with the same data; ``broadcast`` pushes the data to every other
connection. Ack modes, resends, dedupe, keepalive and close codes come from the core.
"""

from __future__ import annotations

import selectors
import socket
import time

from imkit.core import (
    AckMode,
    AckTimers,
    Closed,
    ConnState,
    ErrorCode,
    Event,
    Frame,
    HandshakeRequested,
    HttpRequested,
    Identity,
    MessageReceived,
    PeerOptions,
    ServerConn,
)

ROUTES = ("echo", "broadcast")


class Client:
    """One accepted socket: its core connection and the bytes not yet written."""

    def __init__(self, sock: socket.socket, conn: ServerConn) -> None:
        self.sock = sock
        self.conn = conn
        self.outbox = bytearray()


class SelectorServer:
    """A single-threaded WebSocket IM server: one ``selectors`` loop, one ServerConn per
    socket. :meth:`serve_forever` blocks; :meth:`stop` may be called from another thread.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8765,
        *,
        ack_mode: AckMode = AckMode.ONLY,
        timers: AckTimers | None = None,
    ) -> None:
        self.options = PeerOptions(ack_mode=ack_mode, timers=timers or AckTimers())
        self.listener = socket.create_server((host, port))
        self.listener.setblocking(False)
        self.port: int = self.listener.getsockname()[1]
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, None)
        # A socket pair lets stop() wake the loop: select() sleeps on a real event.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.clients: dict[socket.socket, Client] = {}
        self._running = True

    # --------------------------------------------------------------- the loop
    def serve_forever(self) -> None:
        """Serve until :meth:`stop`; then close every socket."""
        while self._running:
            for key, mask in self.selector.select(self._timeout()):
                if key.data is None:
                    self._accept()
                elif key.data == "wake":
                    self._wake_r.recv(64)
                else:
                    self._ready(key.data, mask)
            # Fire every deadline that has passed: resends, ack timeouts, keepalive pings,
            # idle and close timeouts. Then write and act, as after any input.
            now = time.monotonic()
            for client in list(self.clients.values()):
                deadline = client.conn.next_deadline()
                if deadline is not None and deadline <= now:
                    client.conn.handle_timeout(now)
                    self._after_input(client)
        for client in list(self.clients.values()):
            self._drop(client)
        self.selector.close()
        self.listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def stop(self) -> None:
        """Make :meth:`serve_forever` return (from any thread)."""
        self._running = False
        self._wake_w.send(b"x")

    def _timeout(self) -> float | None:
        """Sleep until the earliest deadline of any connection (None: until I/O)."""
        deadlines = [c.conn.next_deadline() for c in self.clients.values()]
        present = [d for d in deadlines if d is not None]
        return max(0.0, min(present) - time.monotonic()) if present else None

    def _accept(self) -> None:
        sock, address = self.listener.accept()
        sock.setblocking(False)
        conn = ServerConn(now=time.monotonic(), path="/ws", remote_addr=address[0])
        client = Client(sock, conn)
        self.clients[sock] = client
        self.selector.register(sock, selectors.EVENT_READ, client)

    def _ready(self, client: Client, mask: int) -> None:
        if client.sock not in self.clients:
            return  # dropped earlier in this round
        if mask & selectors.EVENT_READ:
            try:
                data: bytes | None = client.sock.recv(65536) or None  # b"": end of stream
            except ConnectionError:
                data = None
            client.conn.receive_data(data, time.monotonic())
            self._after_input(client)
        if mask & selectors.EVENT_WRITE:
            self._flush(client)

    # --------------------------------------------------------------- after each input
    def _after_input(self, client: Client) -> None:
        """Act on the events, then write what the connection has to send."""
        conn = client.conn
        events = conn.events()
        while events:  # acting (accept, send) may produce more events
            for event in events:
                self._handle(client, event)
            events = conn.events()
        self._flush(client)

    def _handle(self, client: Client, event: Event) -> None:
        conn = client.conn
        now = time.monotonic()
        if isinstance(event, HandshakeRequested):
            # Path and Origin were checked by the core. Decide who it is: this example
            # trusts ?user= (development only); a real server verifies a token here,
            # e.g. imkit.TokenAuth(secret).verify(imkit.auth.request_token(request)).
            user = event.request.query.get("user")
            if not user:
                conn.reject(401, "missing ?user=")
            else:
                conn.accept(
                    Identity(user), now, options=self.options, accepts_method=ROUTES.__contains__
                )
        elif isinstance(event, HttpRequested):
            conn.respond(426, b"this endpoint speaks WebSocket\n", [("Upgrade", "websocket")])
        elif isinstance(event, MessageReceived):
            self._route(client, event.frame)
        elif isinstance(event, Closed):
            pass  # _flush() drops the socket once the last bytes are out
        # Delivered, DeliveryFailed, MessageExpired, ErrorReceived: nothing to do here.

    def _route(self, client: Client, frame: Frame) -> None:
        conn, now = client.conn, time.monotonic()
        if frame.method == "echo":
            conn.send("echo", frame.data, now, reply_to=frame.id)
        elif frame.method == "broadcast":
            for other in list(self.clients.values()):
                if other is not client and other.conn.state is ConnState.OPEN:
                    other.conn.send("broadcast", frame.data, now, form_id=frame.form_id)
                    self._flush(other)
            conn.send("broadcast", {"ok": True}, now, reply_to=frame.id)
        else:  # accepts_method already refuses unknown methods; kept for safety
            conn.send_error(ErrorCode.UNKNOWN_METHOD, "no such method", frame.id, now)

    # --------------------------------------------------------------- writing
    def _flush(self, client: Client) -> None:
        """Write what the core produced; watch for writability while bytes are left."""
        client.outbox += client.conn.data_to_send()
        if client.outbox:
            try:
                sent = client.sock.send(client.outbox)
            except BlockingIOError:
                sent = 0
            except OSError:
                client.outbox.clear()
                client.conn.receive_data(None, time.monotonic())  # the socket is gone
                client.conn.events()
                sent = 0
            del client.outbox[:sent]
        if client.conn.closed and not client.outbox:
            self._drop(client)
            return
        wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.outbox else 0)
        if client.sock in self.clients and self.selector.get_key(client.sock).events != wanted:
            self.selector.modify(client.sock, wanted, client)

    def _drop(self, client: Client) -> None:
        if self.clients.pop(client.sock, None) is not None:
            self.selector.unregister(client.sock)
            client.sock.close()


if __name__ == "__main__":
    server = SelectorServer()
    print(f"serving on ws://127.0.0.1:{server.port}/ws?user=NAME (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
