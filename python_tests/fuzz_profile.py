"""Hypothesis profiles of the fuzz tests, in one place.

``SAM_KERNELS_FUZZ`` picks the profile: unset or ``ci`` runs the bounded, derandomized CI profile (the same
examples on every run); ``long`` runs 15 times as many examples with fresh random draws (a failure prints
its ``@reproduce_failure`` blob). Neither profile keeps an example database, so runs leave no files behind.

Each fuzz property is two tests (``fuzz_tests``): the default run takes ``QUICK_SHARE`` of the profile's
examples, and a twin marked ``slow`` (``pytest -m slow``) takes them all. Derandomized, the quick test's
examples are the first ones of its twin's.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings

ENV = "SAM_KERNELS_FUZZ"
CI_EXAMPLES = 150
LONG_FACTOR = 15
#: The share of a property's examples in the default run (its slow twin runs them all).
QUICK_SHARE = 0.1

_COMMON = {
    "deadline": None,  # the Triton interpreter's first launches are slow; time is bounded by max_examples
    "database": None,
    "print_blob": True,
    # NOTE: the autouse single_thread fixture of conftest.py is function-scoped; it only sets the thread
    # count, which may as well hold for all examples of a test.
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                              HealthCheck.data_too_large],
}

settings.register_profile("sam-kernels-ci", max_examples=CI_EXAMPLES, derandomize=True, **_COMMON)
settings.register_profile("sam-kernels-long", max_examples=CI_EXAMPLES * LONG_FACTOR, derandomize=False,
                          **_COMMON)

_choice = os.environ.get(ENV, "ci").strip().lower() or "ci"
if _choice not in ("ci", "long"):
    raise ValueError(f"{ENV}={_choice!r}: expected 'ci' (the default) or 'long'")
PROFILE = f"sam-kernels-{_choice}"


def fuzz_settings(weight: float = 1.0) -> settings:
    """The active profile with ``weight`` times its example count (cheap tests take more examples)."""
    profile = settings.get_profile(PROFILE)
    return settings(profile, max_examples=max(1, round(profile.max_examples * weight)))


def fuzz_tests(check, weight: float = 1.0, **strategies) -> tuple:
    """The property ``check`` (a function of pytest fixtures and of the draws of ``strategies``) as two
    tests, ``weight`` times the profile's example count in all: the default run's, with ``QUICK_SHARE`` of
    them, and its twin marked slow, with every one."""
    quick = fuzz_settings(weight * QUICK_SHARE)(given(**strategies)(check))
    full = pytest.mark.slow(fuzz_settings(weight)(given(**strategies)(check)))
    return quick, full
