"""The benchmarks' machine factor (benchmarks/calibration.py): issue 6's absolute offline
target read on the machine at hand, from the peers measured in the same run."""

from __future__ import annotations

import math

import pytest
from benchmarks.calibration import ISSUE_REFERENCE_US, machine_factor


def test_the_issue_machine_has_factor_one() -> None:
    machine = machine_factor(dict(ISSUE_REFERENCE_US))
    assert machine is not None
    assert machine.factor == pytest.approx(1.0)
    assert machine.scaled(25.0) == pytest.approx(25.0)


def test_factor_is_the_geometric_mean_of_the_peers_ratios() -> None:
    # websockets 3x slower, picows 2x slower: sqrt(3 * 2).
    machine = machine_factor({"websockets": 99.0, "picows": 30.0})
    assert machine is not None
    assert machine.ratios == {"websockets": pytest.approx(3.0), "picows": pytest.approx(2.0)}
    assert machine.factor == pytest.approx(math.sqrt(6.0))
    assert machine.scaled(25.0) == pytest.approx(25.0 * math.sqrt(6.0))
    assert machine.describe() == (
        "machine factor 2.45 (geometric mean of picows 2.00x of 15 µs, websockets 3.00x of 33 µs)"
    )


def test_a_faster_machine_lowers_the_target() -> None:
    machine = machine_factor({"socketio": 95.0})
    assert machine is not None
    assert machine.scaled(25.0) == pytest.approx(12.5)


def test_servers_without_a_reference_and_bad_figures_are_left_out() -> None:
    machine = machine_factor(
        {"imkit": 10.0, "websockets": 66.0, "aiohttp": 0.0, "picows": math.nan}
    )
    assert machine is not None
    assert set(machine.ratios) == {"websockets"}
    assert machine.factor == pytest.approx(2.0)


def test_no_reference_peer_no_factor() -> None:
    assert machine_factor({}) is None
    assert machine_factor({"imkit": 20.0, "websockets": -1.0}) is None
