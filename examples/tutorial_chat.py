"""The chat server and client of docs/tutorial.md.

Start the server, then two clients in two more terminals::

    python examples/tutorial_chat.py serve
    python examples/tutorial_chat.py bob
    python examples/tutorial_chat.py alice bob "hello bob"

``tests/docs/test_tutorial.py`` runs this file's app and client on loopback, and checks
that the code blocks of the tutorial are this file's code.
"""

from __future__ import annotations

import sys

import anyio

import imkit

# --- server
app = imkit.App(auth=imkit.InsecureDevAuth())  # development only: ?userId= names you


@app.route("echo")
async def echo(ctx: imkit.Context) -> None:
    await ctx.reply(ctx.data)


@app.route("chat.send")
async def chat_send(ctx: imkit.Context) -> None:
    message = {"from": ctx.user_id, "text": ctx.data["text"]}
    reached = await ctx.server.send_to_users([ctx.data["to"]], "chat.message", message)
    await ctx.reply({"reached": reached})


# --- client
async def chat(url: str, me: str, to: str = "", text: str = "") -> None:
    async with imkit.connect(f"{url}?userId={me}") as client:
        if to:
            answer = await client.request("chat.send", {"to": to, "text": text})
            print(f"sent to {answer['reached']} connection(s) of {to}")
        async for push in client:  # each push is acknowledged for you
            print(f"{push.data['from']}: {push.data['text']}")


# --- main
if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        app.run(port=8000)
    elif len(sys.argv) in (2, 4):
        me, to, text = [*sys.argv[1:], "", ""][:3]
        anyio.run(chat, "ws://127.0.0.1:8000/ws", me, to, text)
    else:
        sys.exit(__doc__)
