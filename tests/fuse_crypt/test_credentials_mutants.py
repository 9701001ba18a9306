"""fuse_crypt/backend/credentials.py (CredentialBox) in process, for mutation testing
(tools/mutation.py): versions, the unchanged case, the bounded wait on both sides (with a
real clock and, for the edge, a fake one), and both client adapters reading the box per use.

The box under real clients (boto3 signing over moto, RetryingTransport's refresh wait) is in
tests/fuse_crypt/test_credential_refresh.py.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from fuse_crypt.backend import credentials as cr
from fuse_crypt.backend.credentials import CredentialBox

A = ("AKID0001", "secret-0001", "token-0001")


def test_initial_value_version_and_repr() -> None:
    box = CredentialBox("AKID0001", "secret-0001")
    assert box.get() == ("AKID0001", "secret-0001", None)
    assert box.version == 0 and box.snapshot() == (0, ("AKID0001", "secret-0001", None))
    assert repr(box) == "CredentialBox(version=0)"
    assert box.set(*A) is True
    assert repr(box) == "CredentialBox(version=1)"
    assert "secret" not in repr(box) and "AKID" not in repr(box)


def test_set_counts_only_changes() -> None:
    box = CredentialBox(*A)
    assert box.set(*A) is False and box.version == 0 and box.get() == A
    for i, new in enumerate(
        [
            ("AKID0002", A[1], A[2]),
            ("AKID0002", "secret-0002", A[2]),
            ("AKID0002", "secret-0002", "token-0002"),
            ("AKID0002", "secret-0002", None),  # dropping the token is a change
            ("AKID0002", "secret-0002", ""),  # and "" is not None
        ],
        start=1,
    ):
        assert box.set(*new) is True
        assert box.snapshot() == (i, new) and box.version == i
        assert box.set(*new) is False and box.version == i


def test_same_is_exact() -> None:
    assert cr._same(A, A) is True
    assert cr._same(A, (A[0], A[1], None)) is False
    assert cr._same((A[0], A[1], None), (A[0], A[1], None)) is True
    assert cr._same((A[0], A[1], None), (A[0], A[1], "")) is False
    assert cr._same(A, ("AKID000", "1secret-0001", A[2])) is False
    assert cr._same(A, (A[0], A[1] + "x", A[2])) is False


def test_wait_newer_returns_at_once_for_an_older_version() -> None:
    box = CredentialBox(*A)
    box.set("AKID0002", "secret-0002", None)
    t0 = time.monotonic()
    assert box.wait_newer(0, 5) is True
    assert box.wait_newer(-1, 5) is True
    assert time.monotonic() - t0 < 0.5


def test_wait_newer_times_out_both_sides_of_the_bound() -> None:
    box = CredentialBox(*A)
    t0 = time.monotonic()
    assert box.wait_newer(0, 0.3) is False  # the current version is not newer
    took = time.monotonic() - t0
    assert 0.29 <= took < 2.0
    t0 = time.monotonic()
    assert box.wait_newer(0, -5) is False and box.wait_newer(0, 0) is False
    assert time.monotonic() - t0 < 0.5


def test_a_set_wakes_a_waiter_and_an_unchanged_set_does_not() -> None:
    box = CredentialBox(*A)
    got: list[bool] = []
    t = threading.Thread(target=lambda: got.append(box.wait_newer(0, 10)))
    t0 = time.monotonic()
    t.start()
    time.sleep(0.1)
    box.set(*A)  # unchanged: nobody woken, still waiting
    time.sleep(0.1)
    assert t.is_alive() and got == []
    box.set("AKID0002", "secret-0002", None)
    t.join(5)
    assert got == [True] and time.monotonic() - t0 < 2


class _Clock:
    def __init__(self, *times: float) -> None:
        self.times = list(times)

    def monotonic(self) -> float:
        return self.times.pop(0) if len(self.times) > 1 else self.times[0]


class _Cond:
    """A condition that records how long it was asked to wait (and never blocks)."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self.inner = threading.Condition()

    def __enter__(self) -> Any:
        return self.inner.__enter__()

    def __exit__(self, *a: Any) -> None:
        self.inner.__exit__(*a)

    def wait(self, t: float) -> bool:
        self.waits.append(t)
        return False


def test_wait_newer_deadline_edges_with_a_fake_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    box = CredentialBox(*A)
    cond = _Cond()
    box._cond = cond  # type: ignore[assignment]
    monkeypatch.setattr(cr, "time", _Clock(100.0, 101.0, 102.0))
    assert box.wait_newer(0, 2.0) is False
    assert cond.waits == [1.0]  # at 102 exactly no time is left: no wait(0)
    cond.waits.clear()
    monkeypatch.setattr(cr, "time", _Clock(100.0, 100.0, 101.0))
    assert box.wait_newer(0, -3.0) is False
    assert cond.waits == []  # a negative timeout is no time at all


def test_oss_source_reads_the_box_per_call() -> None:
    box = CredentialBox(*A)
    src = box.oss_source()
    first = src()
    assert (first.access_key_id, first.access_key_secret, first.security_token) == A
    box.set("AKID0002", "secret-0002", None)
    now = src()
    assert (now.access_key_id, now.access_key_secret, now.security_token) == (
        "AKID0002",
        "secret-0002",
        None,
    )


def test_botocore_credentials_read_the_box_and_ignore_writes() -> None:
    import botocore.credentials

    box = CredentialBox(*A)
    c = box.botocore_credentials()
    assert isinstance(c, botocore.credentials.Credentials)
    assert c.method == "coco-credential-box"
    assert _frozen(c) == A
    assert (c.access_key, c.secret_key, c.token) == A
    box.set("AKID0002", "secret-0002", None)
    assert _frozen(c) == ("AKID0002", "secret-0002", None)
    assert (c.access_key, c.secret_key, c.token) == ("AKID0002", "secret-0002", None)
    c.access_key, c.secret_key, c.token = "x", "y", "z"  # botocore's own refresh: ignored
    assert (c.access_key, c.secret_key, c.token) == ("AKID0002", "secret-0002", None)
    assert box.get() == ("AKID0002", "secret-0002", None) and box.version == 1


def _frozen(c: Any) -> tuple[str, str, str | None]:
    f = c.get_frozen_credentials()
    return (f.access_key, f.secret_key, f.token)


def test_same_compares_each_element_on_its_own() -> None:
    """Joined with separators, two different triples could compare equal (a NUL moved from
    one field to the next, or a token of one byte ``\\x01`` against no token), and a swap
    would be skipped as "unchanged". Producers only hand over printable ASCII today, so
    this guards the box, not a reachable path."""
    assert cr._same(("a\0b", "c", None), ("a", "b\0c", None)) is False
    assert cr._same(("a", "b", None), ("a", "b", "\1")) is False
    assert cr._same(("a", "b", "\1"), ("a", "b", None)) is False
    assert cr._same(("a", "b", "t"), ("a", "b", "t")) is True
    box = CredentialBox("a\0b", "c")
    assert box.set("a", "b\0c", None) is True and box.get() == ("a", "b\0c", None)
