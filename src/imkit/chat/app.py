"""A complete private-chat server in one call: what ``imkit serve`` runs."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources

from imkit.chat.service import ChatService
from imkit.chat.store import MessageStore
from imkit.core.ack import AckMode
from imkit.core.interfaces import Authentication, Discover, HandshakeRequest
from imkit.core.server import App, HttpResponse, LoginPolicy

__all__ = ("chat_page", "create_chat_app")


def chat_page(ack_mode: AckMode, auth_kind: str) -> bytes:
    """The browser chat page (HTML + JS, no build step) for a server's ack mode."""
    html = resources.files("imkit.chat").joinpath("static/index.html").read_text("utf-8")
    html = html.replace("__ACK_MODE__", ack_mode.value).replace("__AUTH__", auth_kind)
    return html.encode("utf-8")


def create_chat_app(
    store: MessageStore,
    *,
    auth: Authentication,
    auth_kind: str = "token",
    ack_mode: AckMode | str = AckMode.ONLY,
    login_policy: LoginPolicy | str = LoginPolicy.SINGLE,
    allowed_origins: Sequence[str] | None = None,
    discover: Discover | None = None,
    serve_page: bool = True,
) -> tuple[App, ChatService]:
    """An :class:`~imkit.App` with the chat routes, offline delivery and the chat page at
    ``/`` (``auth_kind`` is ``"token"`` or ``"dev"``: what the page asks for)."""
    app = App(
        auth=auth,
        ack_mode=ack_mode,
        login_policy=login_policy,
        allowed_origins=allowed_origins,
        discover=discover,
    )
    service = ChatService(store)
    service.install(app)
    if serve_page:
        page = chat_page(app.ack_mode, auth_kind)

        @app.page("/")
        async def index(request: HandshakeRequest) -> HttpResponse:
            return HttpResponse(200, page, content_type="text/html; charset=utf-8")

    return app, service
