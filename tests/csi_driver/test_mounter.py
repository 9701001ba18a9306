"""csi_driver/mounter.py against the real tools: init, the conf checks, key hand-over.

Host-controlled storage is hostile: a planted FIFO, symlink or oversized file where
gocryptfs.conf belongs is refused without blocking, an interrupted init is finished but a
directory that has held data is never re-initialised, and the key reaches a daemon on
stdin only (never argv). ``fuse-crypt init`` (and Debian's gocryptfs, when installed) run
for real; no FUSE mount is needed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from csi_driver import errors, mounter
from csi_driver.keys import VolumeKey
from csi_driver.mounter import (
    CONF_NAME,
    DEFAULT_MOUNTER,
    MOUNTERS,
    FuseCryptMounter,
    GocryptfsMounter,
    make_mounter,
)
from fuse_crypt.configfile import MAX_CONF_BYTES, ConfFile, parse_master_key
from tests.console_scripts import console_script

KEY = VolumeKey(b"0123456789abcdef" * 4, "kbs-derived", 10)
OTHER = VolumeKey(b"fedcba9876543210" * 4, "kbs-derived", 10)

have_gocryptfs = pytest.mark.skipif(
    shutil.which("gocryptfs") is None, reason="gocryptfs (Debian package) not installed"
)


@pytest.fixture
def fuse_crypt() -> FuseCryptMounter:
    return FuseCryptMounter(console_script("fuse-crypt"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_docstring_names_the_real_default_and_every_mounter() -> None:
    doc = mounter.__doc__ or ""
    assert f"``{DEFAULT_MOUNTER}`` (default" in doc
    assert "Three implementations" in doc and len(MOUNTERS) == 3
    for name in MOUNTERS:
        assert f"``{name}``" in doc
    with pytest.raises(ValueError, match="unknown mounter"):
        make_mounter("nfs")


def test_init_creates_the_conf_once_and_never_touches_it_again(
    tmp_path: Path, fuse_crypt: FuseCryptMounter
) -> None:
    cipher = tmp_path / "cipher"
    cipher.mkdir()
    assert not fuse_crypt.is_initialised(str(cipher))
    assert fuse_crypt.ensure_initialised(str(cipher), KEY) is True
    conf = cipher / CONF_NAME
    before = _sha(conf)
    assert ConfFile.read(str(conf)).unlock(KEY.password)  # the volume key opens it
    assert fuse_crypt.ensure_initialised(str(cipher), OTHER) is False
    assert _sha(conf) == before


def test_interrupted_init_is_finished(tmp_path: Path, fuse_crypt: FuseCryptMounter) -> None:
    cipher = tmp_path / "cipher"
    cipher.mkdir()
    (cipher / "gocryptfs.diriv").write_bytes(os.urandom(16))
    (cipher / (CONF_NAME + ".tmp")).write_text("{half a conf")
    assert fuse_crypt.ensure_initialised(str(cipher), KEY) is True
    assert sorted(os.listdir(cipher)) == [CONF_NAME, "gocryptfs.diriv"]


def test_a_volume_that_held_data_is_never_reinitialised(
    tmp_path: Path, fuse_crypt: FuseCryptMounter
) -> None:
    cipher = tmp_path / "cipher"
    cipher.mkdir()
    (cipher / "gocryptfs.diriv").write_bytes(os.urandom(16))
    (cipher / "Zm9vYmFyYmF6").write_bytes(b"ciphertext")
    with pytest.raises(errors.FailedPrecondition, match="not re-initialised"):
        fuse_crypt.ensure_initialised(str(cipher), KEY)
    assert sorted(os.listdir(cipher)) == ["Zm9vYmFyYmF6", "gocryptfs.diriv"]


def test_a_leftover_that_is_a_directory_is_not_a_leftover(
    tmp_path: Path, fuse_crypt: FuseCryptMounter
) -> None:
    cipher = tmp_path / "cipher"
    (cipher / "gocryptfs.diriv").mkdir(parents=True)
    with pytest.raises(errors.FailedPrecondition):
        fuse_crypt.ensure_initialised(str(cipher), KEY)
    assert (cipher / "gocryptfs.diriv").is_dir()


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory", "huge"])
def test_hostile_conf_is_refused_without_blocking(
    tmp_path: Path, fuse_crypt: FuseCryptMounter, kind: str
) -> None:
    cipher = tmp_path / "cipher"
    cipher.mkdir()
    conf = cipher / CONF_NAME
    if kind == "fifo":
        os.mkfifo(conf)  # an open() for reading would block forever
    elif kind == "symlink":
        real = tmp_path / "elsewhere.conf"
        real.write_text("{}")
        conf.symlink_to(real)
    elif kind == "directory":
        conf.mkdir()
    else:
        with open(conf, "wb") as f:
            f.truncate(MAX_CONF_BYTES + 1)  # sparse: costs the host nothing
    started = time.monotonic()
    with pytest.raises(errors.FailedPrecondition):
        fuse_crypt.is_initialised(str(cipher))
    with pytest.raises(errors.FailedPrecondition):
        fuse_crypt.stdin_for(str(cipher), KEY)
    assert time.monotonic() - started < 5


def test_master_key_goes_on_stdin_and_a_wrong_key_fails_first(
    tmp_path: Path, fuse_crypt: FuseCryptMounter
) -> None:
    cipher = tmp_path / "cipher"
    cipher.mkdir()
    fuse_crypt.ensure_initialised(str(cipher), KEY)
    line = fuse_crypt.stdin_for(str(cipher), KEY)
    master = ConfFile.read(str(cipher / CONF_NAME)).unlock(KEY.password)
    assert line.endswith(b"\n") and parse_master_key(line.decode().strip()) == master
    argv = fuse_crypt.command(str(cipher), "/t", readonly=True, allow_other=True, capacity=4096)
    assert argv[1:] == [
        "mount",
        "--foreground",
        "--masterkey",
        "stdin",
        "--ro",
        "--allow-other",
        "--capacity",
        "4096",
        str(cipher),
        "/t",
    ]
    assert not any(KEY.password.decode() in a or master.hex() in a for a in argv)
    with pytest.raises(errors.WrongVolumeKey):
        fuse_crypt.stdin_for(str(cipher), OTHER)
    (cipher / CONF_NAME).unlink()
    with pytest.raises(errors.NotFound):
        fuse_crypt.stdin_for(str(cipher), KEY)
    (cipher / CONF_NAME).write_text('{"Version": 2, "Version": 3}')
    with pytest.raises(errors.FailedPrecondition, match="unusable"):
        fuse_crypt.stdin_for(str(cipher), KEY)


def test_spawned_daemon_gets_its_own_session_and_the_key_on_stdin(
    tmp_path: Path, fuse_crypt: FuseCryptMounter
) -> None:
    log = tmp_path / "daemon.log"
    script = "import os,sys; print(os.getsid(0) == os.getpid(), sys.stdin.read())"
    proc = fuse_crypt.spawn([sys.executable, "-c", script], b"the-key-bytes", str(log))
    assert proc.wait(timeout=30) == 0
    assert log.read_text() == "True the-key-bytes\n"
    # A daemon that dies at once: spawn still returns, the log says why.
    dead = fuse_crypt.spawn(
        [sys.executable, "-c", "raise SystemExit(3)"], b"x" * (1 << 20), str(log)
    )
    assert dead.wait(timeout=30) == 3


def test_probe_reason_names_a_missing_tool(tmp_path: Path) -> None:
    assert FuseCryptMounter(str(tmp_path / "no-such-tool")).unavailable() is not None
    assert "not installed" in str(GocryptfsMounter(str(tmp_path / "nope")).unavailable())


@have_gocryptfs
def test_gocryptfs_mounter_initialises_what_fuse_crypt_opens(
    tmp_path: Path, fuse_crypt: FuseCryptMounter
) -> None:
    gc = GocryptfsMounter()
    cipher = tmp_path / "cipher"
    cipher.mkdir()
    assert gc.ensure_initialised(str(cipher), KEY) is True
    assert fuse_crypt.stdin_for(str(cipher), KEY).strip()  # fuse-crypt unwraps gocryptfs' conf
    assert gc.stdin_for(str(cipher), KEY) == KEY.password
    argv = gc.command(str(cipher), "/t", readonly=True, allow_other=False)
    assert argv[1:] == [
        "-fg",
        "-nosyslog",
        "-passfile",
        "/dev/stdin",
        "-ro",
        "--",
        str(cipher),
        "/t",
    ]
    assert isinstance(gc.failure(12, "", str(cipher)), errors.WrongVolumeKey)
    assert type(gc.failure(1, "boom", str(cipher))) is errors.MountError
