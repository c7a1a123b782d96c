"""One connection's burst of chat messages: ``python -m benchmarks.burst``.

A user sends ``--messages`` private messages back to back on one connection (each as
soon as the server's transport Ack for the one before arrives, not waiting for its
answer), to ``imkit.chat`` on a fresh SQLite file (``synchronous=FULL``) in ``--dir``.
Printed: the time from the first send until the last answer, and how many SQLite write
transactions (each one fsync) stored them. The chat handler defers its answer to the
store's callback (``Context.defer()``), so the next message starts while this one waits
for its commit and a burst shares transactions; one message per transaction means the
connection waited for every fsync.
Runs the server and the client in this process (asyncio), ``--repeat`` times, best first.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import anyio

from imkit.auth import InsecureDevAuth
from imkit.chat.app import create_chat_app
from imkit.chat.sqlite import SQLiteStore
from imkit.core.peer import PeerOptions
from imkit.transport.client import connect
from imkit.transport.server import Server


async def burst(directory: str, messages: int) -> tuple[float, int]:
    """Seconds until the last answer, and the write transactions that stored the burst."""
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        store = SQLiteStore(Path(tmp) / "burst.db")
        app, _service = create_chat_app(
            store,
            auth=InsecureDevAuth(quiet=True),
            auth_kind="dev",
            serve_page=False,
            options=PeerOptions(rate_limit=None),
        )
        server = Server(app)
        async with anyio.create_task_group() as tg:
            port = await tg.start(server.serve, "127.0.0.1", 0)
            url = f"ws://127.0.0.1:{port}/ws?userId=alice"
            async with connect(url) as alice:
                await alice.request("conversation.chat", _chat("warm-up"))
                before = store.write_transactions
                started = time.perf_counter()
                for i in range(messages):
                    await alice.send("conversation.chat", _chat(f"m{i}"))
                answered = 0
                while answered < messages:
                    if (await alice.receive()).reply_to:
                        answered += 1
                elapsed = time.perf_counter() - started
                transactions = store.write_transactions - before
            server.shutdown()
    return elapsed, transactions


def _chat(msg_id: str) -> dict[str, object]:
    return {"chatType": 2, "recvId": "bob", "msgId": msg_id, "msg": {"content": msg_id}}


def main(argv: list[str] | None = None) -> None:
    """Run the burst ``--repeat`` times and print one line per run, best first."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default="/var/tmp", help="where the SQLite file goes")
    args = parser.parse_args(argv)
    runs = [anyio.run(burst, args.dir, args.messages) for _ in range(args.repeat)]
    for elapsed, transactions in sorted(runs):
        print(
            f"{args.messages} messages back to back on one connection: last answer after "
            f"{elapsed * 1000:.0f} ms, {transactions} SQLite transactions"
        )


if __name__ == "__main__":
    main()
