"""fuse_crypt.strictjson: the one JSON loader for hostile documents refuses duplicate members."""

from __future__ import annotations

import pytest

from fuse_crypt import strictjson


def test_duplicate_member_at_any_depth_is_refused() -> None:
    for doc in (b'{"a": 1, "a": 2}', b'{"x": [{"k": 1, "k": 1}]}', '{"a": {"b": 0, "b": 0}}'):
        with pytest.raises(strictjson.DuplicateKeyError):
            strictjson.loads(doc)


def test_duplicate_error_is_a_valueerror_without_the_name() -> None:
    with pytest.raises(ValueError) as err:
        strictjson.loads(b'{"secret-name": 1, "secret-name": 2}')
    assert "secret-name" not in str(err.value)


def test_plain_json_parses_like_json_loads() -> None:
    assert strictjson.loads(b'{"a": [1, 2.5, null, true], "b": "\\u00e9"}') == {
        "a": [1, 2.5, None, True],
        "b": "\u00e9",
    }


def test_bytes_must_be_utf8() -> None:
    with pytest.raises(UnicodeDecodeError):
        strictjson.loads('{"a": 1}'.encode("utf-16"))
