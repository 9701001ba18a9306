"""csi_driver/zygote.py for real: a warm zygote process forks each daemon.

The client starts a real zygote (``python -m csi_driver.zygote``) on a socketpair; each
request is forked from it (the child's argv is the zygote's, not an exec'd
``fuse-crypt``), runs ``fuse_crypt.cli.main`` with the request's stdin, in a session of
its own that outlives the zygote. A malformed request is answered with an error and the
zygote keeps serving; a dead zygote is replaced on the next request. (That no daemon
inherits another volume's key is tests/fuse_crypt/test_key_residue.py.)
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_driver.proc import alive
from csi_driver.zygote import MAX_MSG, ZygoteClient
from fuse_crypt.configfile import ConfFile
from fuse_crypt.daemon import wait_until
from tests.fuse_env import needs_fuse

PASSWORD = b"zygote test password"


@pytest.fixture
def zygote() -> Iterator[ZygoteClient]:
    client = ZygoteClient()
    yield client
    client.close()


# Poll until true or the time is up (fuse_crypt.daemon's own helper).
_wait = functools.partial(wait_until, timeout=20.0)


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _cmdline(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().split(b"\0")


def _init_via(zygote: ZygoteClient, cipher: Path, log: Path) -> int:
    cipher.mkdir()
    argv = ["init", "--scryptn", "10", "--passfile", "/dev/stdin", str(cipher)]
    pid = zygote.spawn(argv, str(log), bytearray(PASSWORD + b"\n"))
    assert _wait(lambda: (cipher / "gocryptfs.conf").exists() and not alive(pid)), _text(log)
    return pid


def test_a_request_runs_the_cli_in_a_forked_child_with_stdin(
    zygote: ZygoteClient, tmp_path: Path
) -> None:
    log = tmp_path / "init.log"
    pid = _init_via(zygote, tmp_path / "cipher", log)
    assert pid != zygote._proc.pid  # type: ignore[union-attr]
    assert ConfFile.read(str(tmp_path / "cipher" / "gocryptfs.conf")).unlock(PASSWORD)
    assert PASSWORD.decode() not in log.read_text()
    assert os.stat(log).st_mode & 0o777 == 0o600


def test_a_malformed_request_is_an_error_and_the_zygote_serves_on(
    zygote: ZygoteClient, tmp_path: Path
) -> None:
    with pytest.raises(OSError, match="ValueError"):
        zygote._send(bytearray(b"no header line at all"))
    with pytest.raises(OSError, match="ValueError"):
        zygote._send(bytearray(b'{"argv": "not a list", "log": "x"}\n'))
    with pytest.raises(OSError, match="too large"):
        zygote.spawn(["init"], str(tmp_path / "l"), bytes(MAX_MSG))
    first = zygote._proc
    _init_via(zygote, tmp_path / "cipher", tmp_path / "init.log")
    assert zygote._proc is first  # the same zygote answered


def test_a_dead_zygote_is_replaced_on_the_next_request(
    zygote: ZygoteClient, tmp_path: Path
) -> None:
    zygote.warm()
    old = zygote._proc
    assert old is not None
    old.send_signal(signal.SIGKILL)
    old.wait(10)
    _init_via(zygote, tmp_path / "cipher", tmp_path / "init.log")
    assert zygote._proc is not None and zygote._proc.pid != old.pid
    # Dead without the client having noticed (its process handle still looks alive): the
    # request finds a closed socket, and is retried once on a fresh zygote.
    second = zygote._proc
    second.send_signal(signal.SIGKILL)
    second.wait(10)
    with subprocess.Popen(["sleep", "30"]) as looks_alive:
        zygote._proc = looks_alive
        _init_via(zygote, tmp_path / "cipher2", tmp_path / "init2.log")
        assert zygote._proc is not looks_alive
        looks_alive.kill()
    zygote.close()
    assert zygote._proc is None


@needs_fuse
def test_a_mount_daemon_is_a_fork_in_its_own_session_and_outlives_the_zygote(
    zygote: ZygoteClient, tmp_path: Path
) -> None:
    cipher = tmp_path / "cipher"
    _init_via(zygote, cipher, tmp_path / "init.log")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "mount.log"
    argv = ["mount", "--foreground", "--passfile", "/dev/stdin", str(cipher), str(mnt)]
    pid = zygote.spawn(argv, str(log), PASSWORD + b"\n")
    try:
        assert _wait(lambda: "Filesystem mounted and ready." in _text(log)), _text(log)
        assert b"csi_driver.zygote" in _cmdline(pid)  # forked, not exec'd
        assert os.getsid(pid) == pid
        zygote_pid = zygote._proc.pid  # type: ignore[union-attr]
        zygote.close()  # the plugin goes away: the zygote exits, the daemon stays
        assert not alive(zygote_pid)
        assert alive(pid)
        (mnt / "file").write_text("still served")
        assert (mnt / "file").read_text() == "still served"
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, check=False)
    assert _wait(lambda: not alive(pid)), "daemon did not exit after unmount"
