"""The collector's young-generation threshold while a server serves (``gc_threshold``)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

import imkit
from imkit.transport._gc import DEFAULT_GC_THRESHOLD, young_generation_threshold
from imkit.transport.server import Server

from .helpers import serve_tcp


@pytest.fixture(autouse=True)
def cpython_default() -> Iterator[None]:
    """Each test starts from CPython's default thresholds and leaves them as found."""
    found = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    try:
        yield
    finally:
        gc.set_threshold(*found)


def test_raised_while_held_and_put_back() -> None:
    with young_generation_threshold(5000):
        assert gc.get_threshold() == (5000, 10, 10)
    assert gc.get_threshold() == (700, 10, 10)


def test_none_changes_nothing() -> None:
    gc.set_threshold(900, 11, 12)
    with young_generation_threshold(None):
        assert gc.get_threshold() == (900, 11, 12)
    assert gc.get_threshold() == (900, 11, 12)


def test_never_lowered_nor_turned_on() -> None:
    gc.set_threshold(20_000, 10, 10)
    with young_generation_threshold(5000):
        assert gc.get_threshold()[0] == 20_000
    assert gc.get_threshold()[0] == 20_000
    gc.set_threshold(0)  # the application turned automatic collections off
    with young_generation_threshold(5000):
        assert gc.get_threshold()[0] == 0
    assert gc.get_threshold()[0] == 0


def test_put_back_when_the_last_holder_ends() -> None:
    first = young_generation_threshold(5000)
    second = young_generation_threshold(8000)
    first.__enter__()
    second.__enter__()
    assert gc.get_threshold()[0] == 8000  # the higher of the two
    first.__exit__(None, None, None)
    assert gc.get_threshold()[0] == 8000  # the second server still serves
    second.__exit__(None, None, None)
    assert gc.get_threshold() == (700, 10, 10)


def test_a_value_changed_meanwhile_is_kept() -> None:
    with young_generation_threshold(5000):
        gc.set_threshold(1234, 10, 10)  # the application's own choice, made while serving
    assert gc.get_threshold()[0] == 1234


def test_put_back_after_an_error() -> None:
    with pytest.raises(RuntimeError), young_generation_threshold(5000):
        raise RuntimeError("the server failed")
    assert gc.get_threshold() == (700, 10, 10)


def test_unusable_thresholds_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"), young_generation_threshold(0):
        pass  # pragma: no cover - never entered
    with pytest.raises(ValueError, match="gc_threshold must be at least 1"):
        Server(imkit.App(auth=imkit.InsecureDevAuth(quiet=True)), gc_threshold=0)


@pytest.mark.anyio
async def test_a_serving_server_holds_the_threshold() -> None:
    app = imkit.App(auth=imkit.InsecureDevAuth(quiet=True))
    async with serve_tcp(app) as server:
        assert server.gc_threshold == DEFAULT_GC_THRESHOLD
        assert gc.get_threshold()[0] == DEFAULT_GC_THRESHOLD
        async with serve_tcp(imkit.App(auth=imkit.InsecureDevAuth(quiet=True))):
            assert gc.get_threshold()[0] == DEFAULT_GC_THRESHOLD
        assert gc.get_threshold()[0] == DEFAULT_GC_THRESHOLD  # the first still serves
    assert gc.get_threshold() == (700, 10, 10)


@pytest.mark.anyio
async def test_gc_threshold_none_leaves_the_collector_be() -> None:
    app = imkit.App(auth=imkit.InsecureDevAuth(quiet=True))
    async with serve_tcp(app, gc_threshold=None):
        assert gc.get_threshold() == (700, 10, 10)
    assert gc.get_threshold() == (700, 10, 10)
