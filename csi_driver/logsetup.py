"""Logging set-up: one line per event, key=value or JSON, never secrets.

Call sites pass structured fields through ``extra={"fields": {...}}``; only those fields and
the message are printed. Nothing here ever formats a request object, so neither the CSI
``secrets`` map nor ``volume_context`` values can reach a log line by accident.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_RESERVED = frozenset({"secrets", "secret", "password", "passphrase", "key", "token"})


def _safe_fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None) or {}
    return {k: ("<redacted>" if k.lower() in _RESERVED else v) for k, v in fields.items()}


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=... logger=... msg="..." k=v`` lines (logfmt-like)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [
            f"ts={ts}.{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"msg={json.dumps(record.getMessage())}",
        ]
        for k, v in _safe_fields(record).items():
            text = str(v)
            parts.append(f"{k}={json.dumps(text) if (' ' in text or not text) else text}")
        if record.exc_info and record.exc_info[0] is not None:
            parts.append(f"exc={record.exc_info[0].__name__}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update({k: v for k, v in _safe_fields(record).items() if k not in doc})
        if record.exc_info and record.exc_info[0] is not None:
            doc["exc"] = record.exc_info[0].__name__
        return json.dumps(doc, default=str)


def setup_logging(fmt: str = "kv", level: str = "info") -> None:
    """Configure the root logger once (idempotent) to write to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # grpc's own logger can print request details at debug level; keep it quiet.
    logging.getLogger("grpc").setLevel(logging.WARNING)
