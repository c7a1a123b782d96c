"""A browser cannot set headers on a WebSocket: it may send its token as a ``token.<t>``
subprotocol. The server must select that subprotocol in its answer, or the browser fails
the connection."""

from __future__ import annotations

import json

import anyio
import pytest
import websockets
from websockets.typing import Subprotocol

import imkit

pytestmark = pytest.mark.anyio

SECRET = "a test secret of enough length"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the websockets client is asyncio-only


async def test_token_subprotocol_is_selected_and_authenticates() -> None:
    app = imkit.App(auth=imkit.TokenAuth(SECRET))

    @app.route("whoami")
    async def whoami(ctx: imkit.Context) -> None:
        await ctx.reply(ctx.user_id)

    token = imkit.mint_token(SECRET, "alice")
    server = imkit.Server(app)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            port = await tg.start(server.serve, "127.0.0.1", 0)
            offered = [Subprotocol(f"token.{token}")]
            async with websockets.connect(f"ws://127.0.0.1:{port}/ws", subprotocols=offered) as ws:
                assert ws.subprotocol == f"token.{token}"
                await ws.send(json.dumps({"frameType": 0, "id": "w1", "method": "whoami"}))
                frames = [json.loads(await ws.recv()) for _ in range(2)]
                reply = next(f for f in frames if f.get("replyTo") == "w1")
                assert reply["data"] == "alice"
            # Without the token the upgrade is refused with 401, before any subprotocol.
            with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
                async with websockets.connect(
                    f"ws://127.0.0.1:{port}/ws", subprotocols=[Subprotocol("token.bad")]
                ):
                    pass
            assert refused.value.response.status_code == 401
            server.shutdown()
