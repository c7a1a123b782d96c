"""Built-in authentication: every refusal is an AuthenticationFailed the client sees as 401."""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Coroutine
from typing import Any

import pytest

from imkit.auth import InsecureDevAuth, JWTAuth, TokenAuth, mint_token, request_token
from imkit.core.interfaces import Authentication, HandshakeRequest, Identity
from imkit.exceptions import AuthenticationFailed, ConfigurationError

SECRET = "s3cret-s3cret-s3cret"
NOW = 1_700_000_000.0


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """The built-in authenticators never suspend: drive them without an event loop."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("suspended")  # pragma: no cover


def request(
    *,
    query: dict[str, str] | None = None,
    headers: list[tuple[str, str]] | None = None,
    subprotocols: list[str] | None = None,
) -> HandshakeRequest:
    return HandshakeRequest(
        "/ws", query=query or {}, headers=headers or [], subprotocols=subprotocols or []
    )


def refused(auth: Authentication, req: HandshakeRequest, reason: str) -> None:
    with pytest.raises(AuthenticationFailed) as info:
        run(auth.authenticate(req))
    assert info.value.status == 401 and info.value.reason == reason


# ---------------------------------------------------------------------- tokens
def test_minted_token_authenticates_from_every_place_a_client_can_put_it() -> None:
    auth = TokenAuth(SECRET, clock=lambda: NOW)
    token = mint_token(SECRET, "alice", device_id="phone", now=NOW, claims={"role": "x"})
    for req in (
        request(headers=[("authorization", f"Bearer {token}")]),
        request(headers=[("authorization", f"bearer   {token} ")]),
        request(query={"token": token}),
        request(subprotocols=["chat", f"token.{token}"]),  # browsers cannot set headers
    ):
        identity = run(auth.authenticate(req))
        assert identity.user_id == "alice" and identity.device_id == "phone"
        assert identity.expires_at == NOW + 24 * 3600
        assert identity.claims["role"] == "x" and identity.claims["iat"] == int(NOW)
    assert isinstance(auth, Authentication)


def test_request_token_precedence_and_absence() -> None:
    both = request(headers=[("authorization", "Bearer h")], query={"token": "q"})
    assert request_token(both) == "h"
    assert request_token(request(headers=[("authorization", "Basic abc")])) is None
    assert request_token(request(query={"token": ""}, subprotocols=["chat"])) is None


def test_device_id_from_the_query_when_the_token_has_none() -> None:
    auth = TokenAuth(SECRET, clock=lambda: NOW)
    token = mint_token(SECRET, "alice", now=NOW, ttl=None)
    identity = run(auth.authenticate(request(query={"token": token, "deviceId": "tab2"})))
    assert identity == Identity("alice", "tab2", None, identity.claims)
    pinned = mint_token(SECRET, "alice", device_id="phone", now=NOW)
    identity = run(auth.authenticate(request(query={"token": pinned, "deviceId": "tab2"})))
    assert identity.device_id == "phone"  # the signed one wins


def test_expired_token_is_401() -> None:
    token = mint_token(SECRET, "alice", ttl=60, now=NOW)
    assert run(
        TokenAuth(SECRET, clock=lambda: NOW + 59).authenticate(request(query={"token": token}))
    )
    refused(
        TokenAuth(SECRET, clock=lambda: NOW + 60), request(query={"token": token}), "token expired"
    )


def test_default_clock_is_wall_time() -> None:
    token = mint_token(SECRET, "alice", ttl=-1)
    refused(TokenAuth(SECRET), request(query={"token": token}), "token expired")
    assert TokenAuth(SECRET).verify(mint_token(SECRET, "alice")).expires_at > time.time()  # type: ignore[operator]


def test_bad_signature_is_401() -> None:
    token = mint_token(SECRET, "alice", now=NOW)
    auth = TokenAuth(SECRET, clock=lambda: NOW)
    forged = mint_token("another-secret-0123", "alice", now=NOW)
    refused(auth, request(query={"token": forged}), "invalid token signature")
    body, _, sig = token.partition(".")
    other_body = base64.urlsafe_b64encode(b'{"sub":"mallory"}').rstrip(b"=").decode()
    refused(auth, request(query={"token": f"{other_body}.{sig}"}), "invalid token signature")
    refused(auth, request(query={"token": body}), "invalid token signature")  # no signature
    refused(auth, request(query={"token": body + "."}), "invalid token signature")


@pytest.mark.parametrize(
    "token",
    [
        "é.abc",  # not ASCII
        "abc.a!b",  # characters outside base64url: no longer skipped
        "abc.x",  # impossible base64 length
    ],
)
def test_malformed_tokens_are_401(token: str) -> None:
    refused(TokenAuth(SECRET), request(query={"token": token}), "malformed token")


def test_a_signature_with_junk_characters_does_not_verify() -> None:
    # Bug found: urlsafe_b64decode skips characters outside the alphabet, so "sig!!"
    # verified like "sig".
    token = mint_token(SECRET, "alice", now=NOW)
    refused(
        TokenAuth(SECRET, clock=lambda: NOW),
        request(query={"token": token + "!!"}),
        "malformed token",
    )


def signed(payload: bytes) -> str:
    """A correctly signed token around an arbitrary payload (as a buggy minter could make)."""
    import hashlib
    import hmac

    body = base64.urlsafe_b64encode(payload).rstrip(b"=").decode()
    sig = hmac.new(SECRET.encode(), body.encode(), hashlib.sha256).digest()
    return f"{body}.{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not json", "malformed token"),
        (b"[1]", "malformed token"),
        (b'{"sub": 5}', "malformed token"),
        (b'{"sub": "a", "exp": "tomorrow"}', "token expired"),
    ],
)
def test_signed_but_malformed_payloads_are_401(payload: bytes, reason: str) -> None:
    refused(TokenAuth(SECRET, clock=lambda: NOW), request(query={"token": signed(payload)}), reason)


def test_signed_payload_with_a_strange_device_is_tolerated() -> None:
    identity = TokenAuth(SECRET).verify(signed(json.dumps({"sub": "a", "dev": 7}).encode()))
    assert identity == Identity("a", "", None, {"sub": "a", "dev": 7})


def test_missing_token_is_401() -> None:
    refused(TokenAuth(SECRET), request(), "missing token")


def test_secrets_must_be_long_and_users_named() -> None:
    with pytest.raises(ConfigurationError, match="16 bytes"):
        TokenAuth("short")
    with pytest.raises(ConfigurationError):
        mint_token(b"short", "alice")
    assert TokenAuth(SECRET.encode())  # bytes secrets work too
    with pytest.raises(ValueError, match="user_id"):
        mint_token(SECRET, "")


def test_authentication_failed_carries_the_status() -> None:
    assert AuthenticationFailed().status == 401
    assert AuthenticationFailed("not allowed", status=403).status == 403


# ---------------------------------------------------------------------- dev auth
def test_insecure_dev_auth_trusts_the_query_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="imkit.auth"):
        auth = InsecureDevAuth()
    assert "development only" in caplog.text
    identity = run(auth.authenticate(request(query={"userId": "bob", "deviceId": "d"})))
    assert identity == Identity("bob", "d")
    assert run(auth.authenticate(request(query={"user": "carol"}))).user_id == "carol"
    refused(auth, request(), "missing userId query parameter")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="imkit.auth"):
        InsecureDevAuth(quiet=True)
    assert caplog.text == ""


# ---------------------------------------------------------------------- JWT
jwt = pytest.importorskip("jwt")
JWT_KEY = "jwt-key-of-at-least-32-bytes-for-hs256"


def jwt_token(claims: dict[str, Any], key: str = JWT_KEY, algorithm: str = "HS256") -> str:
    return str(jwt.encode(claims, key, algorithm=algorithm))


def test_jwt_accepts_a_valid_token() -> None:
    auth = JWTAuth(JWT_KEY, audience="imkit", issuer="me")
    exp = int(time.time()) + 60
    token = jwt_token({"sub": "alice", "dev": "phone", "exp": exp, "aud": "imkit", "iss": "me"})
    identity = run(auth.authenticate(request(headers=[("authorization", f"Bearer {token}")])))
    assert (identity.user_id, identity.device_id, identity.expires_at) == ("alice", "phone", exp)
    plain = run(JWTAuth(JWT_KEY).authenticate(request(query={"token": jwt_token({"sub": "b"})})))
    assert plain.expires_at is None and plain.device_id == ""


def test_jwt_refusals_are_401() -> None:
    auth = JWTAuth(JWT_KEY)
    refused(auth, request(), "missing token")
    expired = jwt_token({"sub": "alice", "exp": int(time.time()) - 10})
    refused(auth, request(query={"token": expired}), "token expired")
    wrong_key = jwt_token({"sub": "alice"}, key="another-jwt-key-of-at-least-32-bytes")
    refused(auth, request(query={"token": wrong_key}), "invalid token")
    refused(auth, request(query={"token": jwt_token({"user": "alice"})}), "invalid token")
    refused(auth, request(query={"token": "garbage"}), "invalid token")
    # "none" is never an accepted algorithm.
    unsigned = str(jwt.encode({"sub": "alice"}, None, algorithm="none"))
    refused(auth, request(query={"token": unsigned}), "invalid token")
    refused(
        JWTAuth(JWT_KEY, audience="imkit"),
        request(query={"token": jwt_token({"sub": "a", "aud": "other"})}),
        "invalid token",
    )
