"""The host-free resource URI checks (sealed_secrets.resource_uri) that kids and keyResources use.

Hostile input: allowed-kid lists come from flags, keyResource from a StorageClass (outside the
trust boundary; csi_driver.keys.check_key_uri is fuzzed with the CSI requests), kids from
sealed strings. Only the documented typed errors may escape, and a
URI that passes must be exactly the host-free form, with no way to smuggle a host, query or
``..`` segment through.
"""

from __future__ import annotations

import contextlib

from hypothesis import given
from hypothesis import strategies as st

from sealed_secrets.errors import ResolverError
from sealed_secrets.keys import check_allowed_kids, is_plain_kid
from sealed_secrets.resource_uri import has_dot_segment, hostless_segments
from tests.fuzzing import fuzz, long_fuzz

_PIECES = st.sampled_from(
    [
        "kbs",
        "kbs:///",
        "kbs+p1:///",
        "kbs://",
        "KBS:///",
        ":",
        "/",
        "//",
        "+",
        "?",
        "#",
        "a",
        "Z9",
        ".",
        "..",
        "-",
        "_",
        "%2e",
        " ",
        "\n",
        "\x00",
        "é",
        "host:8080",
    ]
)
_URIS = st.lists(_PIECES, max_size=10).map("".join) | st.text(max_size=60)


def test_examples() -> None:
    assert hostless_segments("kbs:///a/b/c") == ("a", "b", "c")
    assert hostless_segments("kbs+p:///a/b") is None
    assert hostless_segments("kbs+p:///a/b", plugins=True) == ("a", "b")
    for bad in ("kbs://host/a/b/c", "kbs:///a/b/c?x", "kbs:///a//b", "kbs:///a/b/c\n", "KBS:///a"):
        assert hostless_segments(bad, plugins=True) is None
    assert has_dot_segment(("a", "..")) and not has_dot_segment(("a", ".b"))
    assert is_plain_kid("kbs:///a/b/c") and not is_plain_kid("kbs:///a/../c")


@long_fuzz
@fuzz(quick=300)
@given(_URIS)
def test_hostless_checks_accept_only_the_exact_form(uri: str) -> None:
    segments = hostless_segments(uri, plugins=True)
    if segments is not None:
        scheme, sep, path = uri.partition(":///")
        assert sep and path == "/".join(segments) and scheme.startswith("kbs")
        assert all(seg and "/" not in seg for seg in segments)
    if is_plain_kid(uri):
        assert uri.startswith("kbs:///") and len(uri.split("/")) == 6
        assert ".." not in uri.split("/")
    with contextlib.suppress(ResolverError):
        check_allowed_kids([uri])
