"""How hard each property is fuzzed: a modest, reproducible budget in CI, a long one on request.

``pytest --fuzz-long`` or ``CLICKPHONE_FUZZ=long`` (see README.md) multiplies every property's
example count and lets hypothesis pick fresh random inputs each run; the CI budget is
derandomized, so a CI run is the same run every time and a failure there reproduces locally.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

ENV = "CLICKPHONE_FUZZ"
FACTOR_ENV = "CLICKPHONE_FUZZ_FACTOR"
LONG_FACTOR = 50


def is_long() -> bool:
    return os.environ.get(ENV, "").strip().lower() == "long"


def fuzz(ci_examples: int, *, long_examples: int | None = None) -> settings:
    """``@fuzz(200)``: 200 examples in CI, ``LONG_FACTOR`` (or ``$CLICKPHONE_FUZZ_FACTOR``) times
    as many in the long profile."""
    health = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
    # no "explain" phase: it traces every line of a failing example's re-runs, which takes minutes
    # on the slow properties; the shrunk example and its traceback are what a failure needs
    phases = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink]
    if is_long():
        factor = int(os.environ.get(FACTOR_ENV, LONG_FACTOR))
        return settings(
            max_examples=long_examples or ci_examples * factor,
            deadline=None,
            suppress_health_check=health,
            phases=phases,
            print_blob=True,
        )
    return settings(
        max_examples=ci_examples,
        deadline=None,
        suppress_health_check=health,
        phases=phases,
        derandomize=True,
        database=None,
    )
