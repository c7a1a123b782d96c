"""The machine factor: issue 6's one absolute target read on the machine at hand.

Issue 6 states every target but one as a ratio to a peer measured in the same run. The
exception is the offline catch-up: "<= 25 µs of server CPU" per message, an absolute
figure set on the machine where the issue's author measured the peers' acked relay
(50 pairs, window 10, 100-byte texts, server CPU per delivered message): picows 15 µs,
aiohttp 24, websockets 33, python-socketio 190. On a slower machine every server's CPU
per message grows, imkit's too, so the absolute figure says more about the machine than
about imkit. The machine factor is how much slower (or faster) this run's machine ran
those same peer servers, on the same workload: the geometric mean, over the reference
peers measured in the run, of (this run's CPU per message / the issue's figure). The
target on this machine is 25 µs times that factor; the absolute comparison is printed
beside it.

Stdlib only: imported by the benchmark runner and by its unit test.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

ISSUE_REFERENCE_US: Mapping[str, float] = {
    "picows": 15.0,
    "aiohttp": 24.0,
    "websockets": 33.0,
    "socketio": 190.0,
}
"""Issue 6's figures: each peer's acked relay, server CPU µs per delivered message, on the
machine where the 25 µs offline target was set."""

REFERENCE_VARIANT = "ack"
"""The relay variant the reference figures are of."""


@dataclass(frozen=True)
class MachineFactor:
    """How much more CPU per message this run's machine took than the issue's, for the
    same peer servers on the same workload."""

    factor: float
    """The geometric mean of :attr:`ratios`: > 1 on a slower machine."""
    ratios: Mapping[str, float]
    """Per reference peer measured in the run: its CPU per message / the issue's."""

    def scaled(self, target_us: float) -> float:
        """``target_us`` (set on the issue's machine) on this run's machine."""
        return target_us * self.factor

    def describe(self) -> str:
        """One line: the factor and what it was made of."""
        parts = ", ".join(
            f"{server} {self.ratios[server]:.2f}x of {ISSUE_REFERENCE_US[server]:g} µs"
            for server in sorted(self.ratios)
        )
        return f"machine factor {self.factor:.2f} (geometric mean of {parts})"


def machine_factor(measured_us: Mapping[str, float]) -> MachineFactor | None:
    """The machine factor from this run's acked-relay CPU per message by server
    (``measured_us``; servers without an issue figure, and figures that are not
    positive and finite, are left out); ``None`` when no reference peer is left."""
    ratios = {
        server: value / ISSUE_REFERENCE_US[server]
        for server, value in measured_us.items()
        if server in ISSUE_REFERENCE_US and math.isfinite(value) and value > 0
    }
    if not ratios:
        return None
    factor = math.exp(sum(math.log(r) for r in ratios.values()) / len(ratios))
    return MachineFactor(factor=factor, ratios=ratios)
