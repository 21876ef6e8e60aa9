"""Always-on mode: one sampler per process, every sample attributed to its request.

Internal. docs/how-it-works.md has the map of its modules; ``_sampler`` explains how
requests are found at a tick and what drives the ticks.
"""

from ._sampler import (
    AlwaysOnSampler,
    always_on_sampler,
    check_settings,
    current_sampler,
    reset_for_tests,
)

__all__ = [
    "AlwaysOnSampler",
    "always_on_sampler",
    "check_settings",
    "current_sampler",
    "reset_for_tests",
]
