"""A private-chat server in a few lines of user code: SQLite + ChatService + TokenAuth.

The same server as ``imkit serve``, built by hand: an :class:`imkit.App` with signed-token
authentication, the chat routes and offline delivery of :class:`ChatService`, and
messages in one SQLite file. Run it::

    export IMKIT_SECRET="at least sixteen bytes of secret"
    python examples/private_chat/server.py --port 8000 --db chat.db

then chat from two terminals (tokens are minted from the same secret)::

    imkit chat --user alice --to bob
    imkit chat --user bob --to alice

Stop it with Ctrl-C or SIGTERM: clients get close 1001 and delivery state is saved.
"""

from __future__ import annotations

import argparse
import logging
import os

from imkit import App, TokenAuth
from imkit.chat.service import ChatService
from imkit.chat.sqlite import SQLiteStore


def build(secret: str, db: str) -> App:
    """The chat application: token auth, the chat routes, a SQLite store."""
    app = App(auth=TokenAuth(secret))
    ChatService(SQLiteStore(db)).install(app)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--db", default="chat.db")
    args = parser.parse_args()
    secret = os.environ.get("IMKIT_SECRET")
    if not secret:
        parser.error("set IMKIT_SECRET to the token secret (16 bytes or more)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    build(secret, args.db).run(host=args.host, port=args.port)


if __name__ == "__main__":
    main()
