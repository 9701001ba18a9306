"""The time budget of one CSI call, checked between steps and handed to subprocesses.

kubelet gives each NodePublishVolume a gRPC deadline; work that outlives it is wasted (the
caller has gone) and, worse, keeps a worker busy. Every blocking step takes
``deadline.remaining()`` as its timeout and ``check`` fails the call with DEADLINE_EXCEEDED
between steps, so the caller's error-path undoes what was started.
"""

from __future__ import annotations

import time

from csi_driver import errors

# Upper bound when the caller set no deadline (or a huge one): nothing runs forever.
MAX_BUDGET = 300.0


class Deadline:
    """A monotonic expiry time."""

    def __init__(self, seconds: float | None = None) -> None:
        budget = MAX_BUDGET if seconds is None else max(0.0, min(float(seconds), MAX_BUDGET))
        self.expiry = time.monotonic() + budget

    @classmethod
    def from_grpc(cls, context: object) -> Deadline:
        """The remaining time of a grpc.ServicerContext (None → MAX_BUDGET)."""
        remaining = getattr(context, "time_remaining", None)
        return cls(remaining() if callable(remaining) else None)

    def remaining(self) -> float:
        return max(0.0, self.expiry - time.monotonic())

    def timeout(self, cap: float) -> float:
        """A subprocess/wait timeout: the step's own cap or what is left, whichever is less."""
        return min(cap, self.remaining())

    def check(self, step: str) -> None:
        if time.monotonic() >= self.expiry:
            raise errors.DeadlineExceeded(f"deadline exceeded before {step}")
