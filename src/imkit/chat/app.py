"""A complete private-chat server in one call: what ``imkit serve`` runs."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import Any

from imkit.chat.service import DEFAULT_MAX_CONTENT_BYTES, ChatService
from imkit.chat.store import MessageStore
from imkit.core.ack import AckMode
from imkit.core.interfaces import Authentication, Discover, HandshakeRequest
from imkit.core.server import App, HttpResponse, LoginPolicy

__all__ = ("chat_page", "create_chat_app")

_AUTH_KINDS = ("token", "dev")


def chat_page(ack_mode: AckMode, auth_kind: str) -> bytes:
    """The browser chat page (HTML + JS, no build step) for a server's ack mode.

    ``auth_kind`` is ``"token"`` (the page asks for a token) or ``"dev"`` (it connects
    with ``?userId=``, for :class:`~imkit.auth.InsecureDevAuth`).
    """
    if auth_kind not in _AUTH_KINDS:
        raise ValueError(f"auth_kind must be one of {_AUTH_KINDS}, not {auth_kind!r}")
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
    max_content_bytes: int = DEFAULT_MAX_CONTENT_BYTES,
    **app_options: Any,
) -> tuple[App, ChatService]:
    """An :class:`~imkit.App` with the chat routes, offline delivery and the chat page at
    ``/``; returns the app and its :class:`~imkit.chat.service.ChatService`.

    ``auth_kind`` is ``"token"`` or ``"dev"``: what the page asks for. ``app_options``
    go to :class:`~imkit.App` (``options``, ``timers``, ``limits``, ``path``, ...).
    """
    app = App(
        auth=auth,
        ack_mode=ack_mode,
        login_policy=login_policy,
        allowed_origins=allowed_origins,
        discover=discover,
        **app_options,
    )
    service = ChatService(store, max_content_bytes=max_content_bytes)
    service.install(app)
    if serve_page:
        page = chat_page(app.ack_mode, auth_kind)

        @app.page("/")
        async def index(request: HandshakeRequest) -> HttpResponse:
            return HttpResponse(
                200,
                page,
                content_type="text/html; charset=utf-8",
                headers=[
                    ("Cache-Control", "no-store"),
                    ("X-Content-Type-Options", "nosniff"),
                    (
                        "Content-Security-Policy",
                        "default-src 'none'; script-src 'unsafe-inline'; "
                        "style-src 'unsafe-inline'; connect-src 'self'",
                    ),
                ],
            )

    return app, service
