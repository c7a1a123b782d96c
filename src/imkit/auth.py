"""Built-in :class:`~imkit.core.interfaces.Authentication` implementations.

* :class:`TokenAuth`: HMAC-SHA256 signed tokens (mint them with :func:`mint_token` or
  ``imkit token --user U``), read from ``Authorization: Bearer``, the ``token`` query
  parameter (what a browser can send), or the ``Sec-WebSocket-Protocol`` header.
* :class:`JWTAuth`: JSON Web Tokens through PyJWT (``pip install 'imkit[jwt]'``).
* :class:`InsecureDevAuth`: trusts ``?userId=`` like easy-chat's default. For development
  only: it lets anyone be anyone, and says so in the log when it is created.

Tokens are never logged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from imkit.core.interfaces import HandshakeRequest, Identity
from imkit.exceptions import AuthenticationFailed, ConfigurationError

__all__ = ("InsecureDevAuth", "JWTAuth", "TokenAuth", "mint_token", "request_token")

logger = logging.getLogger("imkit.auth")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    # validate=True: characters outside the alphabet are an error, not silently skipped
    # (otherwise "sig!!" would verify like "sig").
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)


def _key(secret: str | bytes) -> bytes:
    key = secret.encode() if isinstance(secret, str) else secret
    if len(key) < 16:
        raise ConfigurationError("the token secret must be at least 16 bytes long")
    return key


def mint_token(
    secret: str | bytes,
    user_id: str,
    *,
    device_id: str = "",
    ttl: float | None = 24 * 3600.0,
    now: float | None = None,
    claims: dict[str, Any] | None = None,
) -> str:
    """Make a signed token for ``user_id`` that :class:`TokenAuth` accepts until ``ttl``."""
    if not user_id:
        raise ValueError("user_id must not be empty")
    issued = time.time() if now is None else now
    payload: dict[str, Any] = dict(claims or {})
    payload.update({"sub": user_id, "iat": int(issued)})
    if device_id:
        payload["dev"] = device_id
    if ttl is not None:
        payload["exp"] = issued + ttl
    body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
    signature = hmac.new(_key(secret), body.encode("ascii"), hashlib.sha256).digest()
    return f"{body}.{_b64(signature)}"


def request_token(request: HandshakeRequest) -> str | None:
    """The credential a client presented: Bearer header, ``token`` query, or subprotocol."""
    authorization = request.header("authorization")
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    token = request.query.get("token")
    if token:
        return token
    for protocol in request.subprotocols:
        if protocol.startswith("token."):
            return protocol[6:]
    return None


class TokenAuth:
    """Accepts tokens made by :func:`mint_token` with the same secret.

    A missing, malformed, badly signed or expired token gets HTTP 401. ``clock`` returns
    the wall time in seconds (tests pass a fake one).
    """

    def __init__(self, secret: str | bytes, *, clock: Callable[[], float] = time.time) -> None:
        self._key = _key(secret)
        self._clock = clock

    def verify(self, token: str) -> Identity:
        """Check ``token`` and return its identity; raise ``AuthenticationFailed`` (401)."""
        body, _, signature = token.partition(".")
        try:
            expected = hmac.new(self._key, body.encode("ascii"), hashlib.sha256).digest()
            given = _unb64(signature)
        except (ValueError, UnicodeEncodeError):
            raise AuthenticationFailed("malformed token") from None
        if not signature or not hmac.compare_digest(expected, given):
            raise AuthenticationFailed("invalid token signature")
        try:
            payload = json.loads(_unb64(body))
        except ValueError:
            raise AuthenticationFailed("malformed token") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("sub"), str):
            raise AuthenticationFailed("malformed token")
        expires = payload.get("exp")
        if expires is not None and (
            not isinstance(expires, (int, float)) or expires <= self._clock()
        ):
            raise AuthenticationFailed("token expired")
        device = payload.get("dev", "")
        return Identity(
            user_id=payload["sub"],
            device_id=device if isinstance(device, str) else "",
            expires_at=float(expires) if expires is not None else None,
            claims=payload,
        )

    async def authenticate(self, request: HandshakeRequest) -> Identity:
        """Authenticate the handshake by its token (401 when missing or bad)."""
        token = request_token(request)
        if not token:
            raise AuthenticationFailed("missing token")
        identity = self.verify(token)
        device = request.query.get("deviceId")
        if device and not identity.device_id:
            identity = Identity(identity.user_id, device, identity.expires_at, identity.claims)
        return identity


class JWTAuth:
    """Accepts JSON Web Tokens (``sub`` is the user id, ``dev`` the optional device id)."""

    def __init__(
        self,
        key: str | bytes,
        *,
        algorithms: tuple[str, ...] = ("HS256",),
        audience: str | None = None,
        issuer: str | None = None,
    ) -> None:
        try:
            import jwt
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("JWTAuth needs PyJWT: pip install 'imkit[jwt]'") from exc
        self._jwt = jwt
        self._key = key
        self._algorithms = list(algorithms)
        self._audience = audience
        self._issuer = issuer

    async def authenticate(self, request: HandshakeRequest) -> Identity:
        """Decode and check the JWT (401 when missing, invalid or expired)."""
        token = request_token(request)
        if not token:
            raise AuthenticationFailed("missing token")
        try:
            payload = self._jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                options={"require": ["sub"]},
            )
        except self._jwt.ExpiredSignatureError:
            raise AuthenticationFailed("token expired") from None
        except self._jwt.InvalidTokenError:
            raise AuthenticationFailed("invalid token") from None
        expires = payload.get("exp")
        return Identity(
            user_id=str(payload["sub"]),
            device_id=str(payload.get("dev", "")),
            expires_at=float(expires) if expires is not None else None,
            claims=payload,
        )


class InsecureDevAuth:
    """DEVELOPMENT ONLY: the client names itself with ``?userId=`` (easy-chat's default).

    Anyone can claim to be anyone. Never use it where real users connect.
    """

    def __init__(self, *, quiet: bool = False) -> None:
        if not quiet:
            logger.warning(
                "InsecureDevAuth is enabled: clients choose their own user id with ?userId=. "
                "Use it for development only."
            )

    async def authenticate(self, request: HandshakeRequest) -> Identity:
        """Take the user id from the ``userId`` query parameter (401 when absent)."""
        user_id = request.query.get("userId") or request.query.get("user")
        if not user_id:
            raise AuthenticationFailed("missing userId query parameter")
        return Identity(user_id=user_id, device_id=request.query.get("deviceId", ""))
