"""JSON parsing that refuses an object naming a member twice, and NaN/Infinity.

Why: Python keeps the last duplicate, Go's encoding/json too, but other parsers keep the first,
so a document with a duplicate member can mean two things to two readers (a gocryptfs.conf to
gocryptfs, a JWS header to a verifier). Every parser of hostile JSON in this project (confs,
sealed secrets, volume key JWKs) uses this one; it lives in the lowest package so that all can.
Callers map :class:`DuplicateKeyError` to their own typed error. ``NaN``, ``Infinity`` and
``-Infinity`` are not JSON (RFC 8259) but Python accepts them; a strict reader elsewhere
would refuse the document, so they are refused here too (a plain ValueError).
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["DuplicateKeyError", "loads"]


class DuplicateKeyError(ValueError):
    """A JSON object names the same member twice (the name is not given: it may be secret)."""


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError("duplicate JSON object member")
        out[key] = value
    return out


def loads(data: bytes | str) -> Any:
    """``json.loads`` of UTF-8 ``data``, refusing duplicate members.

    Raises DuplicateKeyError, or what ``json.loads`` raises (ValueError, UnicodeDecodeError,
    RecursionError); DuplicateKeyError is a ValueError, so catch it first to tell it apart.
    """
    text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
    return json.loads(text, object_pairs_hook=_refuse_duplicates, parse_constant=_refuse_constant)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")
