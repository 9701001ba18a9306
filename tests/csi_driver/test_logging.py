"""Log formatting: structured lines, and fields named like secrets are redacted."""

from __future__ import annotations

import json
import logging

from csi_driver.keys import VolumeKey
from csi_driver.logsetup import JsonFormatter, KeyValueFormatter


def _record(fields: dict[str, object]) -> logging.LogRecord:
    rec = logging.LogRecord("csi_driver.test", logging.INFO, __file__, 1, "published", (), None)
    rec.fields = fields
    return rec


def test_key_value_line() -> None:
    line = KeyValueFormatter().format(_record({"volume_id": "coco-1", "target": "/a b"}))
    assert 'msg="published"' in line and "volume_id=coco-1" in line and 'target="/a b"' in line
    assert "\n" not in line


def test_json_line_redacts_secret_named_fields() -> None:
    doc = json.loads(
        JsonFormatter().format(_record({"volume_id": "v", "secrets": "s3cr3t", "token": "t0k"}))
    )
    assert doc["volume_id"] == "v" and doc["msg"] == "published" and doc["level"] == "info"
    assert doc["secrets"] == "<redacted>" and doc["token"] == "<redacted>"
    assert "s3cr3t" not in json.dumps(doc)


def test_volume_key_repr_hides_password() -> None:
    key = VolumeKey(b"super-secret-password", "kbs-derived", 10)
    assert "super-secret" not in repr(key) and "super-secret" not in str(key)


HOSTILE = [
    "vol\nts=2020 level=error msg=forged",
    "a\rb",
    "\x1b[2Jclear",
    "line\u2028sep",
    "para\u2029sep",
    "tab\there",
    'quote" k=v',
    "",
    "nul\0byte",
    "\x85nel",
]


def test_key_value_escapes_every_request_derived_value() -> None:
    """Finding 7: a volume id or path with a newline used to split the log line."""
    for value in HOSTILE:
        line = KeyValueFormatter().format(_record({"volume_id": value, "target": value}))
        assert line.isprintable() and line.isascii(), repr(line)
        rec = _record({})
        rec.msg = f"volume {value} failed"
        line = KeyValueFormatter().format(rec)
        assert line.isprintable() and line.isascii(), repr(line)


def test_json_escapes_every_request_derived_value() -> None:
    for value in HOSTILE:
        rec = _record({"volume_id": value, value or "k": value})
        rec.msg = f"volume {value} failed"
        line = JsonFormatter().format(rec)
        assert line.isprintable() and line.isascii(), repr(line)
        doc = json.loads(line)
        assert doc["volume_id"] == value and doc["msg"] == f"volume {value} failed"
