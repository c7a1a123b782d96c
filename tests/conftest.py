"""Shared test configuration: the hypothesis profiles.

Pick one with ``HYPOTHESIS_PROFILE`` (default ``ci``). Both are bounded so that the whole
core suite runs in well under 90 s on two cores; ``ci`` is derandomized so a CI failure
reproduces locally with the same command.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
