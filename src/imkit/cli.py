"""The ``imkit`` command: ``serve`` a chat server, mint a ``token``, ``chat`` in a terminal.

``imkit serve`` runs :func:`imkit.chat.app.create_chat_app` on SQLite (one file, nothing
else to install) until SIGINT or SIGTERM, then shuts down gracefully: clients get close
1001 and every watermark is saved. ``--port 0`` picks a free port; the bound address is
logged and, with ``--port-file``, written to a file for scripts.

Testing hooks (crash tests only; nothing happens when they are unset):
``IMKIT_FAULT_KILL_AFTER_STORE=N`` ends the process with ``os._exit(137)`` right after
the N-th stored chat message commits, before its answer is sent;
``IMKIT_FAULT_KILL_AFTER_ANSWER=N`` drops the N-th chat message's push to its
recipients (and every push after it) and ends the process 0.2 s later, its answer to the
sender written meanwhile.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

__all__ = ("build_parser", "main")

SECRET_ENV = "IMKIT_SECRET"
FAULT_KILL_AFTER_STORE_ENV = "IMKIT_FAULT_KILL_AFTER_STORE"
FAULT_KILL_AFTER_ANSWER_ENV = "IMKIT_FAULT_KILL_AFTER_ANSWER"


def _fault_count(name: str) -> int:
    """The testing hook ``name``'s count from the environment; 0 when unset."""
    value = os.environ.get(name, "")
    return int(value) if value else 0


class _KillAfterStore:
    """A store that ends the process after its ``after``-th new message commits."""

    def __init__(self, store: Any, after: int) -> None:
        self._store = store
        self._left = after

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def append(self, **fields: Any) -> Any:
        stored, created = await self._store.append(**fields)
        if created:
            self._left -= 1
            if self._left == 0:
                sys.stderr.write(f"{FAULT_KILL_AFTER_STORE_ENV}: exiting after the store\n")
                os._exit(137)
        return stored, created


def _secret(args: argparse.Namespace) -> str:
    secret = args.secret or os.environ.get(SECRET_ENV)
    if not secret:
        raise SystemExit(
            f"imkit: a token secret is needed: pass --secret or set {SECRET_ENV} "
            "(or use --auth dev for development)"
        )
    if len(secret.encode()) < 16:
        raise SystemExit("imkit: the secret must be at least 16 bytes long")
    return secret


def _serve(args: argparse.Namespace) -> int:
    from imkit.auth import InsecureDevAuth, TokenAuth
    from imkit.chat.app import create_chat_app
    from imkit.core.peer import PeerOptions
    from imkit.exceptions import ConfigurationError

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    log = logging.getLogger("imkit.cli")
    auth: Any
    if args.auth == "dev":
        log.warning(
            "*** --auth dev: anyone can connect as anyone with ?userId=. DEVELOPMENT ONLY ***"
        )
        auth = InsecureDevAuth(quiet=True)
    else:
        auth = TokenAuth(_secret(args))
    store: Any
    if args.postgres:
        from imkit.integrations.postgres import PostgresStore

        store = PostgresStore(args.postgres, schema=args.postgres_schema)
    else:
        from imkit.chat.sqlite import SQLiteStore

        store = SQLiteStore(args.db)
    kill_after_store = _fault_count(FAULT_KILL_AFTER_STORE_ENV)
    if kill_after_store:
        store = _KillAfterStore(store, kill_after_store)
    discover: Any = None
    if args.redis:
        from imkit.integrations.redis import RedisDiscover

        discover = RedisDiscover(
            args.redis, node_id=args.node_id, lease_seconds=args.lease, key_prefix=args.redis_prefix
        )
    options = PeerOptions(
        rate_limit=args.rate_limit if args.rate_limit > 0 else None,
        rate_burst=args.rate_burst,
    )
    try:
        app, _service = create_chat_app(
            store,
            auth=auth,
            auth_kind=args.auth,
            ack_mode=args.ack,
            login_policy=args.login,
            allowed_origins=args.origin or None,
            discover=discover,
            options=options,
            trusted_proxies=args.trusted_proxy or (),
        )
    except ConfigurationError as exc:
        raise SystemExit(f"imkit: {exc}") from None
    where = f"PostgreSQL {args.postgres}" if args.postgres else f"SQLite {os.path.abspath(args.db)}"
    _run_server(app, args, where, log)
    return 0


def _run_server(app: Any, args: argparse.Namespace, where: str, log: logging.Logger) -> None:
    """Serve ``app`` until SIGINT/SIGTERM, then shut down gracefully."""
    import anyio
    from anyio.abc import TaskStatus

    from imkit.transport.server import Server

    server_class: type[Server] = Server
    kill_after_answer = _fault_count(FAULT_KILL_AFTER_ANSWER_ENV)
    if kill_after_answer:
        left = [kill_after_answer]

        class KillAfterAnswer(Server):
            def push_here(
                self, user_ids: Sequence[str], method: str, data: Any, *, form_id: str = ""
            ) -> int:
                if method == "push" and left[0] > 0:
                    left[0] -= 1
                    if left[0] == 0:
                        # The answer goes out (the loop runs on); the push never does.
                        sys.stderr.write(f"{FAULT_KILL_AFTER_ANSWER_ENV}: exiting before a push\n")
                        threading.Timer(0.2, os._exit, (137,)).start()
                if method == "push" and left[0] == 0:
                    return 0
                return super().push_here(user_ids, method, data, form_id=form_id)

        server_class = KillAfterAnswer

    async def main() -> None:
        server = server_class(app)
        async with anyio.create_task_group() as tg:

            async def on_signals() -> None:
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        log.info("received signal %d, shutting down", signum)
                        server.shutdown()
                        return

            async def serve(*, task_status: TaskStatus[int]) -> None:
                await server.serve(args.host, args.port, task_status=task_status)
                tg.cancel_scope.cancel()  # stopped: no more signals to wait for

            tg.start_soon(on_signals)
            port = await tg.start(serve)
            log.info(
                "imkit chat server listening on http://%s:%d/ (WebSocket /ws), messages in %s",
                args.host,
                port,
                where,
            )
            if args.port_file:
                temporary = anyio.Path(f"{args.port_file}.tmp")
                await temporary.write_text(f"{port}\n", encoding="ascii")
                await temporary.replace(args.port_file)  # readers never see half a number

    backend_options: dict[str, Any] = {}
    if args.backend == "asyncio" and importlib.util.find_spec("uvloop") is not None:
        backend_options["use_uvloop"] = True
    anyio.run(main, backend=args.backend, backend_options=backend_options)


def _token(args: argparse.Namespace) -> int:
    from imkit.auth import mint_token

    ttl = None if args.ttl <= 0 else float(args.ttl)
    sys.stdout.write(mint_token(_secret(args), args.user, device_id=args.device, ttl=ttl) + "\n")
    return 0


def _chat(args: argparse.Namespace) -> int:
    import anyio

    from imkit.auth import mint_token
    from imkit.chat.client import ChatClient
    from imkit.exceptions import ClientError
    from imkit.transport.client import connect

    token = args.token
    if token is None and args.auth == "token":
        token = mint_token(_secret(args), args.user, device_id=args.device)
    url = args.url
    if args.auth == "dev":
        from urllib.parse import urlencode

        query = {"userId": args.user, **({"deviceId": args.device} if args.device else {})}
        url += ("&" if "?" in url else "?") + urlencode(query)

    def say(text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    async def main() -> None:
        async with connect(url, token=token) as client:
            chat = ChatClient(client, user_id=args.user)
            say(f"connected to {args.url} as {args.user}; chatting with {args.to} (Ctrl-D quits)")

            async def show() -> None:
                async for message in chat.messages():
                    sender = message["sendId"]
                    who = "me" if sender == args.user else sender
                    say(f"[{message['seq']}] {who}: {message['msg']['content']}")

            async with anyio.create_task_group() as tg:
                tg.start_soon(show)
                stdin = anyio.wrap_file(sys.stdin)
                async for line in stdin:
                    text = line.rstrip("\r\n")
                    if text:
                        answer = await chat.send(args.to, text)
                        say(f"[{answer['seq']}] me: {text}")
                tg.cancel_scope.cancel()

    try:
        anyio.run(main)
    except ClientError as exc:
        sys.stderr.write(f"imkit chat: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``imkit`` argument parser."""
    parser = argparse.ArgumentParser(prog="imkit", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a private-chat server (SQLite by default)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    serve.add_argument("--port-file", help="write the bound port to this file once listening")
    serve.add_argument("--db", default="imkit.db", help="SQLite file (default: imkit.db)")
    serve.add_argument("--ack", choices=("none", "only", "rigor"), default="only")
    serve.add_argument("--auth", choices=("token", "dev"), default="token")
    serve.add_argument("--secret", help=f"token secret (default: ${SECRET_ENV})")
    serve.add_argument("--origin", action="append", help="allowed browser Origin (repeatable)")
    serve.add_argument(
        "--trusted-proxy",
        action="append",
        metavar="ADDR",
        help="a reverse proxy (address or network) whose X-Forwarded-For names the client "
        "(repeatable; default: none)",
    )
    serve.add_argument("--login", choices=("single", "multi"), default="single")
    serve.add_argument(
        "--rate-limit",
        type=float,
        default=50.0,
        help="messages per second a connection may send (0: no limit; default: 50)",
    )
    serve.add_argument(
        "--rate-burst", type=int, default=100, help="messages a connection may send at once"
    )
    serve.add_argument("--redis", help="Redis URL for multi-node discovery")
    serve.add_argument("--postgres", help="PostgreSQL DSN (instead of SQLite)")
    serve.add_argument("--postgres-schema", default="public", help="PostgreSQL schema")
    serve.add_argument("--node-id", help="this node's id in a cluster (default: random)")
    serve.add_argument(
        "--lease",
        type=float,
        default=10.0,
        help="seconds a dead node's users stay bound in Redis (default: 10)",
    )
    serve.add_argument("--redis-prefix", default="imkit", help="Redis key prefix (default: imkit)")
    serve.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    serve.add_argument("-v", "--verbose", action="store_true")
    serve.set_defaults(func=_serve)

    token = sub.add_parser("token", help="mint a signed token for a user")
    token.add_argument("--user", required=True)
    token.add_argument("--device", default="")
    token.add_argument("--ttl", type=float, default=24 * 3600, help="seconds (<= 0: never expires)")
    token.add_argument("--secret", help=f"token secret (default: ${SECRET_ENV})")
    token.set_defaults(func=_token)

    chat = sub.add_parser("chat", help="chat in the terminal")
    chat.add_argument("--url", default="ws://127.0.0.1:8000/ws")
    chat.add_argument("--user", required=True)
    chat.add_argument("--to", required=True)
    chat.add_argument("--device", default="", help="this device's id (default: none)")
    chat.add_argument("--auth", choices=("token", "dev"), default="token")
    chat.add_argument("--token", help="a token from `imkit token` (else minted with --secret)")
    chat.add_argument("--secret", help=f"token secret (default: ${SECRET_ENV})")
    chat.set_defaults(func=_chat)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``imkit`` command line."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
