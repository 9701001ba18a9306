"""`fuse-crypt mount --capacity BYTES`: the volume's own size, enforced, on a real mount."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fuse_crypt.configfile import format_master_key
from fuse_crypt.contentenc import ContentEnc
from fuse_crypt.cryptocore import CryptoCore
from fuse_crypt.fusefrontend.quota import Quota
from tests.fuse_env import fuse_skip_reason

from .cli_helpers import force_unmount, is_mounted
from .conftest import Volume, make_volume

MIB = 1 << 20
FUSE_CRYPT = str(Path(sys.executable).with_name("fuse-crypt"))


@pytest.fixture
def capped(tmp_path: Path) -> Iterator[tuple[Path, Volume]]:
    reason = fuse_skip_reason(None)
    if reason:
        pytest.skip(reason)
    vol = make_volume(tmp_path / "cipher")
    mp = tmp_path / "mnt"
    mp.mkdir()
    argv = [FUSE_CRYPT, "mount", "--foreground", "--masterkey", "stdin", "--capacity"]
    argv += [str(2 * MIB), str(vol.cipherdir), str(mp)]
    log = tmp_path / "log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=out)
    assert proc.stdin is not None
    proc.stdin.write(format_master_key(vol.master_key).encode() + b"\n")
    proc.stdin.close()
    deadline = time.monotonic() + 30
    while b"mounted and ready" not in log.read_bytes():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)
    try:
        yield mp, vol
    finally:
        if is_mounted(mp):
            force_unmount(mp)
        proc.wait(timeout=20)


def test_statfs_shows_the_volumes_size(capped: tuple[Path, Volume]) -> None:
    mp, _ = capped
    sv = os.statvfs(mp)
    assert sv.f_blocks * sv.f_frsize == 2 * MIB
    free = sv.f_bavail * sv.f_frsize
    assert 2 * MIB - 8192 <= free < 2 * MIB  # the conf and dir IV are counted at mount


def test_growth_past_capacity_is_enospc_and_unlink_frees(capped: tuple[Path, Volume]) -> None:
    mp, _ = capped
    (mp / "a").write_bytes(os.urandom(MIB))
    with pytest.raises(OSError) as err:
        (mp / "b").write_bytes(os.urandom(MIB + 1))
    assert err.value.errno == errno.ENOSPC
    with open(mp / "c", "wb") as f, pytest.raises(OSError) as err:
        f.truncate(3 * MIB)
    assert err.value.errno == errno.ENOSPC
    assert (mp / "a").read_bytes()  # what fitted is intact
    os.unlink(mp / "a")
    os.unlink(mp / "b")
    (mp / "d").write_bytes(os.urandom(MIB))  # fits again
    sv = os.statvfs(mp)
    assert sv.f_bavail * sv.f_frsize < MIB


def test_renaming_over_a_file_frees_it(capped: tuple[Path, Volume]) -> None:
    """Editors save by writing a temp file and renaming it over: that must not leak."""
    mp, _ = capped
    for _ in range(5):
        (mp / "tmp").write_bytes(os.urandom(600_000))
        os.rename(mp / "tmp", mp / "doc")
    sv = os.statvfs(mp)
    assert sv.f_bavail * sv.f_frsize > MIB // 2


def test_quota_charges_ciphertext_sizes() -> None:
    enc = ContentEnc(CryptoCore(bytes(32)))
    q = Quota(enc.cipher_size(4096))
    q.charge(enc.cipher_size(4096))
    with pytest.raises(OSError) as err:
        q.charge(1)
    assert err.value.errno == errno.ENOSPC and q.used == enc.cipher_size(4096)
    q.charge(-(10**9))
    assert q.used == 0
    sv = q.statfs({"f_frsize": 4096, "f_bsize": 4096, "f_bfree": 10**9, "f_bavail": 10**9})
    assert sv["f_blocks"] == enc.cipher_size(4096) // 4096
    with pytest.raises(ValueError):
        Quota(0)


@pytest.mark.parametrize("bad", ["0", "-1", "1e6", "x", "\u0661"])
def test_bad_capacity_is_a_usage_error(tmp_path: Path, bad: str) -> None:
    proc = subprocess.run(
        [FUSE_CRYPT, "mount", "--capacity", bad, str(tmp_path), str(tmp_path / "m")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "--capacity" in proc.stderr
    assert "Traceback" not in proc.stderr
