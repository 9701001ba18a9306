"""Plaintext names never reach the daemon's log (issue 7, finding 5).

The mount log is host-visible (a hostPath in the chart; syslog on a plain host): it may
name cipher paths and inode numbers, never plaintext file names, contents or symlink
targets. Two checks: a real ``fuse-crypt mount`` at DEBUG level driven through every
error path we can provoke with marker names, and a static scan of every logging call in
fuse_crypt for arguments that carry plaintext.
"""

from __future__ import annotations

import ast
import errno
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fuse_crypt.contentenc import CIPHER_BS, HEADER_LEN
from tests.fuse_env import needs_fuse

from .cli_helpers import force_unmount, init_volume, is_mounted, write_passfile
from .conftest import CipherView, Volume

ROOT = Path(__file__).resolve().parents[2]
MARKER = "patientMARKERx"


def _expect_eio(fn: Callable[[], object]) -> None:
    with pytest.raises(OSError) as ei:
        fn()
    assert ei.value.errno == errno.EIO


@needs_fuse
def test_corruption_logs_name_no_plaintext(tmp_path: Path) -> None:
    passfile = write_passfile(tmp_path / "pw", "log privacy password")
    cipher = init_volume(tmp_path / "cipher", passfile)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log_path = tmp_path / "daemon.log"
    env = dict(os.environ, FUSE_CRYPT_LOG_LEVEL="DEBUG")

    def mount() -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fuse_crypt.cli", "mount", "-f", "--passfile", str(passfile)]
                + [str(cipher), str(mnt)],
                stdout=log,
                stderr=log,
                env=env,
            )
        deadline = time.monotonic() + 30
        while not is_mounted(mnt):
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        return proc

    def unmount(proc: subprocess.Popen[bytes]) -> None:
        force_unmount(mnt)
        proc.wait(10)

    proc = mount()
    try:
        d = mnt / f"{MARKER}-dir"
        d.mkdir()
        (d / f"{MARKER}-file.pdf").write_bytes(f"{MARKER}-content ".encode() * 1000)
        os.symlink(f"/{MARKER}-target", d / f"{MARKER}-link")
        os.setxattr(d / f"{MARKER}-file.pdf", f"user.{MARKER}", f"{MARKER}-xattr".encode())
        (d / (MARKER * 10)).write_bytes(b"long name")
        (d / f"{MARKER}-file.pdf").rename(d / f"{MARKER}-renamed.pdf")
    finally:
        unmount(proc)

    # Tamper while unmounted: one flipped byte in content, symlink target and xattr.
    from fuse_crypt.configfile import ConfFile

    conf = ConfFile.read(str(cipher / "gocryptfs.conf"))
    vol = Volume(cipher, conf.unlock(b"log privacy password"))
    cv = CipherView(vol)
    cfile = cv.cpath(f"{MARKER}-dir/{MARKER}-renamed.pdf")
    raw = bytearray(cfile.read_bytes())
    raw[HEADER_LEN + CIPHER_BS // 2] ^= 1
    os.chmod(cfile, 0o600)
    cfile.write_bytes(bytes(raw))
    clink = cv.cpath(f"{MARKER}-dir/{MARKER}-link")
    target = os.readlink(clink)
    os.unlink(clink)
    os.symlink(("A" if target[0] != "A" else "B") + target[1:], clink)
    xname = next(n for n in os.listxattr(cfile) if n.startswith("user.gocryptfs."))
    value = bytearray(os.getxattr(cfile, xname))
    value[-1] ^= 1
    os.setxattr(cfile, xname, bytes(value))
    junk = cv.cpath(f"{MARKER}-dir").parent / cv.cpath(f"{MARKER}-dir").name / "notbase64!"
    junk.write_bytes(b"")

    proc = mount()
    try:
        f = mnt / f"{MARKER}-dir" / f"{MARKER}-renamed.pdf"
        _expect_eio(f.read_bytes)
        _expect_eio(lambda: os.readlink(mnt / f"{MARKER}-dir" / f"{MARKER}-link"))
        _expect_eio(lambda: os.getxattr(f, f"user.{MARKER}"))
        names = os.listdir(mnt / f"{MARKER}-dir")
        assert MARKER * 10 in names
        with pytest.raises(FileNotFoundError):
            (mnt / f"{MARKER}-dir" / f"{MARKER}-missing").stat()
    finally:
        unmount(proc)

    log = log_path.read_text(errors="replace")
    assert "event=corrupt_block" in log and "corrupt_symlink" in log, log
    assert "corrupt_xattr" in log and "undecryptable_name" in log, log
    assert MARKER not in log, [line for line in log.splitlines() if MARKER in line]
    assert vol.master_key.hex() not in log.lower()


# --------------------------------------------------------------------------- static scan

#: Variable names that hold plaintext paths, names, contents or symlink targets in
#: fuse_crypt. A logging call may not pass any of them (cipher-side values are named
#: cpath/cdir/disk/parked/...).
PLAINTEXT_NAMES = {
    "path",
    "plain",
    "plain_path",
    "plain_dir",
    "name",
    "target",
    "source",
    "old",
    "new",
    "data",
    "value",
    "content",
}
#: (file, function) pairs whose ``path`` argument is known to be a cipher path.
ALLOWED: set[tuple[str, str]] = set()
_LOG_METHODS = {"debug", "info", "warning", "error", "critical", "exception", "log"}


def _log_calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    out: list[tuple[str, ast.Call]] = []

    def visit(node: ast.AST, func: str) -> None:
        for child in ast.iter_child_nodes(node):
            f = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else func
            if (
                isinstance(child, ast.Call)
                and isinstance(child.func, ast.Attribute)
                and child.func.attr in _LOG_METHODS
                and isinstance(child.func.value, ast.Name)
                and child.func.value.id in {"log", "logger", "_log", "logging"}
            ):
                out.append((f, child))
            visit(child, f)

    visit(tree, "")
    return out


def test_no_logging_call_passes_plaintext() -> None:
    offenders = []
    for py in sorted((ROOT / "fuse_crypt").rglob("*.py")):
        rel = str(py.relative_to(ROOT))
        for func, call in _log_calls(ast.parse(py.read_text())):
            if (rel, func) in ALLOWED:
                continue
            for arg in [*call.args[1:], *(k.value for k in call.keywords)]:
                for node in ast.walk(arg):
                    if isinstance(node, ast.Name) and node.id in PLAINTEXT_NAMES:
                        offenders.append(f"{rel}:{call.lineno} {func}: {node.id}")
                    if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "_path_arg":
                        offenders.append(f"{rel}:{call.lineno} {func}: _path_arg")
    assert not offenders, offenders


def test_static_scan_catches_the_old_pattern() -> None:
    """The scan would have flagged the lines issue 7 found (operations.py:183 style)."""
    src = 'def readlink(self, path):\n    log.warning("event=corrupt_symlink path=%s", path)\n'
    calls = _log_calls(ast.parse(src))
    assert calls and any(
        isinstance(n, ast.Name) and n.id in PLAINTEXT_NAMES for n in ast.walk(calls[0][1].args[1])
    )
