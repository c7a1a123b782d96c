"""A tiny imkit server: an echo route and one-to-one messages, with acks.

Run it::

    python examples/echo_chat.py --port 8000

then talk to it with any WebSocket client, one JSON frame per message::

    websocat 'ws://127.0.0.1:8000/ws?userId=alice'
    {"frameType": 0, "id": "1", "method": "echo", "data": "hello"}
    {"frameType": 0, "id": "2", "method": "chat.send", "data": {"to": "bob", "text": "hi"}}

or with imkit's client::

    async with imkit.connect("ws://127.0.0.1:8000/ws?userId=bob") as bob:
        async for message in bob:
            print(message.form_id, message.data)

Users name themselves with ``?userId=`` (:class:`imkit.InsecureDevAuth`): for development
only. Use :class:`imkit.TokenAuth` anywhere real.
"""

from __future__ import annotations

import argparse
import logging

import imkit

app = imkit.App(auth=imkit.InsecureDevAuth(), ack_mode="only")


@app.route("echo")
async def echo(ctx: imkit.Context) -> None:
    """Answer with the message's own data."""
    await ctx.reply(ctx.data)


@app.route("chat.send")
async def send(ctx: imkit.Context) -> None:
    """Deliver ``{"to": user, "text": ...}`` to every connection of ``user``."""
    data = ctx.data if isinstance(ctx.data, dict) else {}
    to, text = data.get("to"), data.get("text")
    if not isinstance(to, str) or not isinstance(text, str):
        raise imkit.HandlerError("bad_request", 'expected {"to": str, "text": str}')
    reached = await ctx.server.send_to_users([to], "chat.message", {"text": text})
    await ctx.reply({"delivered_to": reached})


@app.on_connect
async def welcome(session: imkit.Session, server: imkit.ServerAPI) -> None:
    """Greet each new connection."""
    await session.push("chat.welcome", {"you": session.user_id})


def main() -> None:
    """Serve until Ctrl-C."""
    parser = argparse.ArgumentParser(description="imkit echo and chat example")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    app.run(host=args.host, port=args.port)


if __name__ == "__main__":
    main()
