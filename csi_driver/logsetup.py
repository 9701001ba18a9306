"""Logging set-up: one line per event, key=value or JSON, never secrets.

Call sites pass structured fields through ``extra={"fields": {...}}``; only those fields and
the message are printed. Nothing here ever formats a request object, so neither the CSI
``secrets`` map nor ``volume_context`` values can reach a log line by accident.

Request-derived values (paths, ids, error texts quoting them) are hostile: every value and
the message are escaped in both formats, so a newline, a carriage return, an ANSI escape or
a Unicode line separator can never split a line or forge another event. Only characters of
``_PLAIN`` appear bare in key=value output; everything else is JSON-quoted with non-ASCII
escaped.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

_RESERVED = frozenset({"secrets", "secret", "password", "passphrase", "key", "token"})
_PLAIN = re.compile(r"[A-Za-z0-9._:/@+,=-]+")
_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _safe_key(key: object) -> str:
    text = str(key)
    return text if _KEY.fullmatch(text) else "field"


def _safe_fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None) or {}
    out: dict[str, Any] = {}
    for k, v in fields.items():
        key = _safe_key(k)
        out[key] = "<redacted>" if key.lower() in _RESERVED else v
    return out


def kv_value(value: object) -> str:
    """One key=value value: bare if plain, else a JSON string (ASCII-only, escaped)."""
    text = str(value)
    return text if _PLAIN.fullmatch(text) else json.dumps(text, ensure_ascii=True)


def _json_value(value: object) -> object:
    return value if isinstance(value, (bool, int, float)) or value is None else str(value)


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=... logger=... msg="..." k=v`` lines (logfmt-like)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [
            f"ts={ts}.{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"msg={json.dumps(record.getMessage(), ensure_ascii=True)}",
        ]
        for k, v in _safe_fields(record).items():
            parts.append(f"{k}={kv_value(v)}")
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
        doc.update({k: _json_value(v) for k, v in _safe_fields(record).items() if k not in doc})
        if record.exc_info and record.exc_info[0] is not None:
            doc["exc"] = record.exc_info[0].__name__
        return json.dumps(doc, default=str, ensure_ascii=True)


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
