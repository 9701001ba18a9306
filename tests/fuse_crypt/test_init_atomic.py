"""``fuse-crypt init`` is atomic (issue 7, finding 12).

The conf is the commit point and is written last (tmp, fsync, rename, directory fsync).
A directory that is empty or holds only what an interrupted init leaves (the root
``gocryptfs.diriv`` and/or ``gocryptfs.conf.tmp``, no conf) is still new: init completes
it. Anything else is refused with exit code 40 and left untouched. The crash tests kill
init (``os._exit``) at every durable step and check what a retry sees.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fuse_crypt.cli.exitcodes import CIPHERDIR_NOT_NEW
from fuse_crypt.configfile import TMP_NAME, ConfFile
from fuse_crypt.nametransform import CONF_NAME, DIRIV_NAME

from .cli_helpers import PASSWORD, assert_one_line_error, fc


def _init(cipher: Path, passfile: Path) -> subprocess.CompletedProcess[str]:
    return fc("init", "--scryptn", "10", "--passfile", passfile, cipher)


def _assert_complete(cipher: Path) -> None:
    assert sorted(os.listdir(cipher)) == [CONF_NAME, DIRIV_NAME]
    conf = ConfFile.read(str(cipher / CONF_NAME))
    conf.unlock(PASSWORD.encode())
    assert len((cipher / DIRIV_NAME).read_bytes()) == 16


@pytest.mark.parametrize(
    "leftovers", [[DIRIV_NAME], [TMP_NAME], [DIRIV_NAME, TMP_NAME]], ids=lambda x: "+".join(x)
)
def test_init_completes_an_interrupted_init(
    tmp_path: Path, passfile: Path, leftovers: list[str]
) -> None:
    cipher = tmp_path / "c"
    cipher.mkdir()
    for name in leftovers:
        (cipher / name).write_bytes(b"\xaa" * 16)
        os.chmod(cipher / name, 0o400)
    proc = _init(cipher, passfile)
    assert proc.returncode == 0, proc.stderr
    _assert_complete(cipher)
    assert (cipher / DIRIV_NAME).read_bytes() != b"\xaa" * 16  # a fresh IV, not the leftover


@pytest.mark.parametrize(
    ("setup", "needle"),
    [
        ({CONF_NAME: b"{}"}, "already holds a volume"),
        ({DIRIV_NAME: bytes(16), "data": b"x"}, "not empty"),
        ({DIRIV_NAME: bytes(16), "gocryptfs.longname.x": b"x"}, "not empty"),
        ({TMP_NAME: b"x", CONF_NAME + ".bak": b"x"}, "not empty"),
        ({"sub/": b""}, "not empty"),
        ({DIRIV_NAME + "/": b""}, "not empty"),  # a directory where the diriv belongs
        ({DIRIV_NAME + "@fifo": b""}, "not empty"),
        ({DIRIV_NAME + "@link": b""}, "not empty"),
    ],
)
def test_init_refuses_what_is_not_new(
    tmp_path: Path, passfile: Path, setup: dict[str, bytes], needle: str
) -> None:
    cipher = tmp_path / "c"
    cipher.mkdir()
    for name, data in setup.items():
        if name.endswith("/"):
            (cipher / name[:-1]).mkdir()
        elif name.endswith("@fifo"):
            os.mkfifo(cipher / name[: -len("@fifo")])
        elif name.endswith("@link"):
            os.symlink("/etc/hostname", cipher / name[: -len("@link")])
        else:
            (cipher / name).write_bytes(data)
    before = {p.name: (p.is_symlink(), os.lstat(p).st_mode) for p in cipher.iterdir()}
    line = assert_one_line_error(_init(cipher, passfile), CIPHERDIR_NOT_NEW)
    assert needle in line
    after = {p.name: (p.is_symlink(), os.lstat(p).st_mode) for p in cipher.iterdir()}
    assert after == before


def test_init_twice_refuses_second(tmp_path: Path, passfile: Path) -> None:
    cipher = tmp_path / "c"
    cipher.mkdir()
    assert _init(cipher, passfile).returncode == 0
    conf_before = (cipher / CONF_NAME).read_bytes()
    assert_one_line_error(_init(cipher, passfile), CIPHERDIR_NOT_NEW)
    assert (cipher / CONF_NAME).read_bytes() == conf_before


# The durable steps of init, in order. Each crash point makes the Nth call to the
# patched function exit the process at once (like SIGKILL: no cleanup, no finally).
_CRASH = r"""
import os, sys
what, nth = sys.argv[1], int(sys.argv[2])
count = [0]
orig = getattr(os, what)
def crash(*a, **k):
    count[0] += 1
    if count[0] == nth:
        os._exit(137)
    return orig(*a, **k)
setattr(os, what, crash)
from fuse_crypt.cli import main
sys.exit(main(sys.argv[3:]))
"""
CRASH_POINTS = [
    ("unlink", 1),  # removing the first leftover
    ("fsync", 1),  # diriv written, before its fsync
    ("fsync", 2),  # diriv durable, before the directory fsync
    ("fsync", 3),  # conf tmp written, before its fsync
    ("rename", 1),  # conf tmp durable, before the commit
    ("fsync", 4),  # committed, before the directory fsync
]


@pytest.mark.parametrize(("what", "nth"), CRASH_POINTS, ids=lambda x: str(x))
def test_crash_at_each_step_leaves_new_or_complete(
    tmp_path: Path, passfile: Path, what: str, nth: int
) -> None:
    cipher = tmp_path / "c"
    cipher.mkdir()
    (cipher / TMP_NAME).write_bytes(b"leftover")  # so the unlink step exists
    args = ["init", "--scryptn", "10", "--passfile", str(passfile), str(cipher)]
    crashed = subprocess.run(
        [sys.executable, "-c", _CRASH, what, str(nth), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    assert crashed.returncode == 137, crashed.stderr
    committed = (cipher / CONF_NAME).exists()
    assert committed == ((what, nth) == ("fsync", 4))
    if committed:
        _assert_complete(cipher)  # the conf alone makes it a volume; a retry refuses
        assert_one_line_error(_init(cipher, passfile), CIPHERDIR_NOT_NEW)
    else:
        assert set(os.listdir(cipher)) <= {DIRIV_NAME, TMP_NAME}
        proc = _init(cipher, passfile)  # still new: the retry completes it
        assert proc.returncode == 0, proc.stderr
        _assert_complete(cipher)
    info = fc("info", cipher)
    assert info.returncode == 0, info.stderr
