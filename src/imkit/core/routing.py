"""Routes: which async handler answers which ``method``.

A :class:`Router` is filled through :meth:`imkit.App.route` and frozen when the server
starts; after that it cannot change, so a lookup needs no lock.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from imkit.exceptions import ConfigurationError

if TYPE_CHECKING:
    from imkit.core.server import Context

__all__ = ("Handler", "Route", "Router")

Handler = Callable[["Context"], Awaitable[Any]]
"""An async function taking the :class:`~imkit.core.server.Context` of one message."""

H = TypeVar("H", bound=Handler)


@attrs.frozen(slots=True)
class Route:
    """One registered method and its handler."""

    method: str
    handler: Handler


class Router:
    """Maps method names to routes; validated on registration, immutable once frozen."""

    def __init__(self) -> None:
        self._routes: dict[str, Route] = {}
        self._frozen = False

    def add(self, method: str, handler: Handler) -> Route:
        """Register ``handler`` for ``method``."""
        if self._frozen:
            raise ConfigurationError("routes cannot change once the server has started")
        if not isinstance(method, str) or not method or method != method.strip():
            raise ConfigurationError(f"a route needs a non-empty method name, got {method!r}")
        if method in self._routes:
            raise ConfigurationError(f"method {method!r} already has a route")
        if not inspect.iscoroutinefunction(handler) and not inspect.iscoroutinefunction(
            getattr(handler, "__call__", None)  # noqa: B004 - async callable objects count
        ):
            raise ConfigurationError(f"the handler of {method!r} must be an async function")
        route = Route(method, handler)
        self._routes[method] = route
        return route

    def route(self, method: str) -> Callable[[H], H]:
        """Decorator form of :meth:`add`."""

        def register(handler: H) -> H:
            self.add(method, handler)
            return handler

        return register

    def freeze(self) -> None:
        """Forbid further changes."""
        self._frozen = True

    @property
    def frozen(self) -> bool:
        """Whether the router can still change."""
        return self._frozen

    def get(self, method: str) -> Route | None:
        """The route of ``method``, or ``None``."""
        return self._routes.get(method)

    def __contains__(self, method: object) -> bool:
        return method in self._routes

    @property
    def contains(self) -> Callable[[object], bool]:
        """``method in router`` as the routes' own bound ``__contains__``: asked once per
        message, it costs no Python call (it follows later :meth:`add` calls)."""
        return self._routes.__contains__

    def __iter__(self) -> Iterator[Route]:
        return iter(self._routes.values())

    def __len__(self) -> int:
        return len(self._routes)
