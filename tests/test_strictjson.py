"""fuse_crypt.strictjson: the one JSON loader for hostile documents refuses duplicate members."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuse_crypt import strictjson
from tests.fuzzing import fuzz, long_fuzz


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


def test_nan_and_infinity_are_refused() -> None:
    """Not JSON (RFC 8259), though json.loads takes them; 1e999 is a number and parses."""
    for doc in (b'{"a": NaN}', b"[Infinity]", b'{"x": [-Infinity]}'):
        with pytest.raises(ValueError, match="non-standard JSON constant"):
            strictjson.loads(doc)
    assert strictjson.loads(b"[1e999]") == [float("inf")]


def test_bytes_must_be_utf8() -> None:
    with pytest.raises(UnicodeDecodeError):
        strictjson.loads('{"a": 1}'.encode("utf-16"))


@long_fuzz
@fuzz(quick=300)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_arbitrary_input_raises_only_value_errors(data: bytes) -> None:
    with contextlib.suppress(ValueError, RecursionError):  # DuplicateKeyError is a ValueError
        strictjson.loads(data)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=12,
)


@long_fuzz
@fuzz(quick=200)
@given(st.dictionaries(st.text(max_size=4), _JSON, min_size=1, max_size=5), st.data())
def test_same_as_json_loads_unless_a_member_repeats(doc: dict[str, Any], data: Any) -> None:
    text = json.dumps(doc)
    assert strictjson.loads(text.encode()) == json.loads(text)
    key = data.draw(st.sampled_from(sorted(doc)))
    repeated = text[:-1] + ", " + json.dumps(key) + ": 0}"
    with pytest.raises(strictjson.DuplicateKeyError):
        strictjson.loads(repeated)
