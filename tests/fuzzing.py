"""One convention for fuzz depth: quick in every run, 100,000 cases in the marked long run.

Every parser that reads hostile input (sealed strings, JWE, gocryptfs.conf, CSI requests,
on-disk headers) has a property test decorated with ``fuzz(quick=N)``. The normal suite runs
N cases; ``pytest -m longfuzz`` (see README) re-runs the tests marked ``longfuzz`` with
LONG_EXAMPLES cases each. A failure in either must be a typed error escaping, never a crash.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings

LONG_EXAMPLES = int(os.environ.get("COCO_LONG_FUZZ_EXAMPLES", "100000"))

F = TypeVar("F", bound=Callable[..., Any])


def fuzz(quick: int = 200) -> Callable[[F], F]:
    """Hypothesis settings: ``quick`` cases normally, LONG_EXAMPLES under ``-m longfuzz``."""
    long_run = os.environ.get("COCO_LONG_FUZZ") == "1"
    return settings(
        max_examples=LONG_EXAMPLES if long_run else quick,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        database=None,
    )


def long_fuzz(func: F) -> F:
    """Mark a fuzz test for the long run (it also runs, quick, in the normal suite)."""
    return pytest.mark.longfuzz(func)
