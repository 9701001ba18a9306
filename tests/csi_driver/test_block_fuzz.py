"""Property tests for what a block-volume request (or a header's segment) can carry: only
typed CSI errors escape, and whatever passes is in the allowed shape."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st

from csi_driver import errors
from csi_driver.volumes import blockdev
from csi_driver.volumes.block_luks import check_segment
from tests.fuzzing import fuzz, long_fuzz

_paths = st.one_of(
    st.text(max_size=80),
    st.builds(lambda s: "/dev/" + s, st.text(max_size=40)),
    st.sampled_from(["/dev/null", "/dev/loop0", "/dev/disk/by-id/x", "/dev/../etc", "/dev/zero"]),
)


@long_fuzz
@fuzz(quick=200)
@given(
    path=_paths,
    dev_id=st.one_of(
        st.just(""), st.text(max_size=20), st.from_regex(r"[0-9]{1,4}:[0-9]{1,4}", fullmatch=True)
    ),
)
def test_resolve_device_only_typed_errors(path: str, dev_id: str) -> None:
    ctx = {"devicePath": path} if not dev_id else {"deviceId": dev_id}
    try:
        dev = blockdev.resolve_device(ctx)
    except errors.CsiError:
        return
    assert dev.path.startswith("/dev/") and not dev.is_image
    assert os.path.realpath(dev.path) == dev.path or dev_id


@long_fuzz
@fuzz(quick=300)
@given(fs=st.sampled_from(blockdev.FILESYSTEMS), raw=st.one_of(
    st.text(max_size=60),
    st.lists(st.sampled_from(["-b", "4096", "-L", "x", "-E", "lazy_itable_init=0", "-j", "-d",
                              "/etc", "-O", "^has_journal", "--", "-m", "crc=1"]), max_size=8
             ).map(" ".join),
))  # fmt: skip
def test_mkfs_options_pass_only_allowed_words(fs: str, raw: str) -> None:
    try:
        opts = blockdev.mkfs_options(fs, raw)
    except errors.InvalidArgument:
        return
    allowed = blockdev._MKFS_ALLOWED[fs]
    i = 0
    while i < len(opts):
        assert opts[i] in allowed
        i += 1 if allowed[opts[i]] is None else 2
    assert not any(o.startswith("/") for o in opts)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@long_fuzz
@fuzz(quick=300)
@given(
    seg=st.fixed_dictionaries(
        {},
        optional={
            "type": st.sampled_from(["crypt", "linear"]) | _json,
            "encryption": st.sampled_from(["aes-xts-plain64", "cipher_null-ecb"]) | _json,
            "sector_size": st.sampled_from([4096, 512, True, 4096.0]) | _json,
            "iv_tweak": st.sampled_from(["0", "8", 0]) | _json,
            "offset": st.sampled_from(["16777216", "0", "+1", " 1", "1_0"]) | _json,
            "size": st.sampled_from(["dynamic", "4096", "0", "100", 4096]) | _json,
            "integrity": _json,
            "flags": _json,
        },
    )
)
def test_check_segment_only_typed_errors(seg: dict) -> None:  # type: ignore[type-arg]
    try:
        offset, size, sector, cipher = check_segment(seg)
    except errors.FailedPrecondition:
        return
    assert sector == 4096 and offset % 4096 == 0 and cipher in ("aes-xts-plain64", "aes-xts-plain")
    assert size is None or (size > 0 and size % 4096 == 0)
    assert "integrity" not in seg and "flags" not in seg
    assert type(seg["sector_size"]) is int and isinstance(seg["size"], str)


def test_check_segment_refuses_lookalikes() -> None:
    import pytest

    good = {
        "type": "crypt",
        "offset": "16777216",
        "size": "dynamic",
        "iv_tweak": "0",
        "encryption": "aes-xts-plain64",
        "sector_size": 4096,
    }
    assert check_segment(dict(good)) == (16777216, None, 4096, "aes-xts-plain64")
    for key, value in [
        ("sector_size", 4096.0),
        ("sector_size", True),
        ("size", 4096),
        ("offset", "+16777216"),
        ("offset", 16777216),
        ("iv_tweak", 0),
        ("encryption", "cipher_null-ecb"),
        ("size", "0"),
        ("offset", "512"),
    ]:
        with pytest.raises(errors.FailedPrecondition):
            check_segment({**good, key: value})
    with pytest.raises(errors.FailedPrecondition, match="kernel engine"):
        check_segment({**good, "integrity": {"type": "hmac(sha256)"}})
