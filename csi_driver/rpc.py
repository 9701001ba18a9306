"""The one place CSI RPCs are logged and CsiError becomes a gRPC status.

Only the safe identifying fields of a request are logged (volume_id, target_path, name);
never the message itself, whose ``secrets`` and ``volume_context`` may carry sealed
passphrases or service-account tokens.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import grpc

from csi_driver import errors
from csi_driver.metrics import Metrics

log = logging.getLogger("csi_driver.rpc")

SAFE_FIELDS = ("volume_id", "target_path", "volume_path", "name", "node_id")

F = TypeVar("F", bound=Callable[..., Any])


def _safe(request: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in SAFE_FIELDS:
        value = getattr(request, name, None)
        if isinstance(value, str) and value:
            out[name] = value
    return out


def csi_rpc(method: str) -> Callable[[F], F]:
    """Decorate a servicer method: log, time, map CsiError to its status code."""

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            fields = {"rpc": method, **_safe(request)}
            metrics: Metrics | None = getattr(self, "metrics", None)
            try:
                response = fn(self, request, context)
            except errors.CsiError as exc:
                fields.update(code=exc.code.name, ms=f"{(time.perf_counter() - start) * 1e3:.1f}")
                log.warning(str(exc), extra={"fields": fields})
                if metrics is not None:
                    metrics.failures.labels(method, exc.code.name).inc()
                context.abort(grpc.StatusCode[exc.code.name], str(exc))
            except Exception as exc:
                fields.update(code="INTERNAL", exc=type(exc).__name__)
                log.exception("unexpected failure", extra={"fields": fields})
                if metrics is not None:
                    metrics.failures.labels(method, "INTERNAL").inc()
                context.abort(grpc.StatusCode.INTERNAL, f"{method} failed: {type(exc).__name__}")
            fields.update(code="OK", ms=f"{(time.perf_counter() - start) * 1e3:.1f}")
            log.debug("rpc", extra={"fields": fields})
            return response

        return cast(F, wrapper)  # functools.wraps keeps fn's name; the signature is fn's

    return deco
