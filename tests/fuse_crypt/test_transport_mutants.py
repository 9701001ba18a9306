"""transport.py's typed errors and records, pinned exactly (for mutation testing).

Why: the FUSE frontend answers a failed bucket request with the error's ``errno`` (ENOENT
makes a file vanish, EEXIST makes a create-only write lose, EIO keeps the spool), and the
retrying wrapper and the backend decide by the error's *type*.  A wrong default errno or a
message lost on the way would turn "retry later" into "no such file".
"""

from __future__ import annotations

import dataclasses
import errno
import inspect

import pytest

from fuse_crypt.backend.oss import OssTransport
from fuse_crypt.backend.retrying import RetryingTransport
from fuse_crypt.backend.s3 import S3Transport
from fuse_crypt.backend.transport import (
    AccessDenied,
    BadResponse,
    ListPage,
    ObjectInfo,
    ObjectNotFound,
    ObjectStoreError,
    ObjectTransport,
    PreconditionFailed,
    TransientError,
)
from tests.fuse_crypt.fake_transport import FakeTransport

DEFAULTS = [
    (ObjectStoreError, errno.EIO),
    (ObjectNotFound, errno.ENOENT),
    (PreconditionFailed, errno.EEXIST),
    (AccessDenied, errno.EACCES),
    (TransientError, errno.EIO),
    (BadResponse, errno.EIO),
]


@pytest.mark.parametrize("cls, code", DEFAULTS, ids=[c.__name__ for c, _ in DEFAULTS])
def test_each_error_carries_its_default_errno_and_its_message(
    cls: type[ObjectStoreError], code: int
) -> None:
    e = cls("OSS GET: 503 SlowDown")
    assert isinstance(e, ObjectStoreError) and isinstance(e, OSError)
    assert e.errno == code
    assert e.strerror == "OSS GET: 503 SlowDown"
    assert e.args == (code, "OSS GET: 503 SlowDown")
    assert str(e) == f"[Errno {code}] OSS GET: 503 SlowDown"


@pytest.mark.parametrize("cls, code", DEFAULTS, ids=[c.__name__ for c, _ in DEFAULTS])
def test_an_explicit_errno_wins_over_the_default(cls: type[ObjectStoreError], code: int) -> None:
    e = cls("bad key", errno.EINVAL)
    assert e.errno == errno.EINVAL and e.strerror == "bad key"
    assert cls("too big", errno_=errno.E2BIG).errno == errno.E2BIG
    assert cls("explicit none", None).errno == code


def test_errno_zero_is_an_explicit_errno_not_a_missing_one() -> None:
    """``0`` is falsy: only ``None`` means "use the default"."""
    assert ObjectNotFound("x", 0).errno == 0


def test_error_types_are_distinct_for_the_retry_policy() -> None:
    """Only TransientError is retried; none of the others may be one."""
    for cls in (ObjectNotFound, PreconditionFailed, AccessDenied, BadResponse, ObjectStoreError):
        assert not issubclass(cls, TransientError)


def test_records_are_frozen_with_the_documented_defaults() -> None:
    info = ObjectInfo("k", 1, "e", 2)
    assert (info.metadata, info.content_type) == ({}, "")
    assert ObjectInfo("a", 0, "e", 0).metadata is not ObjectInfo("b", 0, "e", 0).metadata
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.size = 5  # type: ignore[misc]
    page = ListPage((info,), ("p/",), None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        page.next_token = "t"  # type: ignore[misc]


def _methods() -> list[str]:
    """The protocol's methods (mutmut adds its own names to the class: left out)."""
    return [n for n in vars(ObjectTransport) if not n.startswith("_") and "mutmut" not in n]


@pytest.mark.parametrize(
    "impl",
    [OssTransport, S3Transport, RetryingTransport, FakeTransport],
    ids=lambda c: c.__name__,
)
def test_every_transport_has_the_protocols_signatures_and_defaults(impl: type) -> None:
    """The protocol's defaults (``start=0``, ``delimiter="/"``, ``max_keys=1000``, a
    create-only PUT only when asked, the octet-stream type) are what callers rely on when
    they leave an argument out; mypy checks the types but not the default *values*, and the
    protocol's own stubs never run, so each implementation is compared with them here."""
    assert len(_methods()) == 12
    for name in _methods():
        want = inspect.signature(getattr(ObjectTransport, name))
        got = inspect.signature(getattr(impl, name))
        assert [(p.name, p.kind, p.default) for p in got.parameters.values()] == [
            (p.name, p.kind, p.default) for p in want.parameters.values()
        ], name
