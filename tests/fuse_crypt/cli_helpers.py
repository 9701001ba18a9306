"""Helpers for tests that drive the real ``fuse-crypt`` command as a subprocess.

Shared by the CLI, lifecycle and gocryptfs interop tests. Mount checks read
/proc/self/mountinfo directly rather than through fuse_crypt's own mount table code,
so a bug there cannot hide itself from the tests.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

FC = [sys.executable, "-m", "fuse_crypt.cli"]

#: The password of every test volume (conftest's ``passfile`` holds it; ``Volume`` uses it).
PASSWORD = "test password for fuse_crypt"


def fc(*args: str | Path, stdin: str = "", timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """Run ``fuse-crypt`` with ``args``; stdin is closed after ``stdin`` (never the tty)."""
    return subprocess.run(
        [*FC, *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    """The CLI failed with ``code`` and said so in exactly one prefixed stderr line."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fuse-crypt: "), lines[0]
    assert "Traceback" not in proc.stderr
    return lines[0]


def free_port() -> int:
    """A TCP port free on loopback right now (for ``--metrics-addr 127.0.0.1:PORT``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def metrics_text(port: int) -> str:
    """The body of a real HTTP GET of ``/metrics`` on loopback ``port``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        body: bytes = r.read()
    return body.decode()


def scrape_metrics(port: int) -> dict[str, float]:
    """``/metrics`` as {series with labels: value}."""
    out: dict[str, float] = {}
    for line in metrics_text(port).splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def write_passfile(path: Path, password: str) -> Path:
    path.write_text(password + "\n")
    return path


def init_volume(cipher: Path, passfile: Path) -> Path:
    """A fresh ``fuse-crypt init`` volume (scrypt logN 10, to keep tests fast)."""
    cipher.mkdir()
    proc = fc("init", "--scryptn", "10", "--passfile", passfile, cipher)
    assert proc.returncode == 0, proc.stderr
    return cipher


def is_mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return any(line.split(" ")[4] == str(path) for line in f)


def force_unmount(path: Path) -> None:
    """Teardown: unmount ``path`` if still mounted, lazily if a plain unmount is refused."""
    for argv in (["fusermount3", "-u", str(path)], ["fusermount3", "-u", "-z", str(path)]):
        if not is_mounted(path):
            return
        subprocess.run(argv, capture_output=True, check=False)


def unmount(path: Path) -> None:
    """Unmount ``path`` and check it is gone (a refused unmount fails the test)."""
    subprocess.run(["fusermount3", "-u", str(path)], check=True, capture_output=True)
    assert not is_mounted(path)


def gocryptfs_init(cipher: Path, passfile: Path | str, *extra: str) -> None:
    """``gocryptfs -init`` (logN 10, fast) of the existing, empty ``cipher``; ``extra``:
    more init flags (``-aessiv``, ``-plaintextnames``, ...)."""
    argv = ["gocryptfs", "-q", "-init", "-scryptn", "10", *extra, "-passfile", str(passfile)]
    subprocess.run([*argv, "--", str(cipher)], check=True, capture_output=True, timeout=120)


@contextlib.contextmanager
def mounted(argv: list[str], mountpoint: Path) -> Iterator[Path]:
    """Run ``argv``, a mount command that returns once it serves ``mountpoint`` (made if
    missing), for the with block; then unmount strictly."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    try:
        yield mountpoint
    finally:
        unmount(mountpoint)


def gocryptfs_mount(
    cipher: Path, mountpoint: Path, passfile: Path
) -> contextlib.AbstractContextManager[Path]:
    """Debian's gocryptfs on ``mountpoint`` for the with block."""
    argv = ["gocryptfs", "-q", "-passfile", str(passfile), "--", str(cipher), str(mountpoint)]
    return mounted(argv, mountpoint)


def fuse_crypt_mount(
    cipher: Path, mountpoint: Path, passfile: Path
) -> contextlib.AbstractContextManager[Path]:
    """``fuse-crypt mount`` (daemonised) on ``mountpoint`` for the with block."""
    return mounted(
        [*FC, "mount", "--passfile", str(passfile), str(cipher), str(mountpoint)], mountpoint
    )


def daemon_pids(mountpoint: Path) -> list[int]:
    """PIDs of fuse-crypt processes whose command line names this (unique) mount point."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"fuse_crypt.cli" in argv and str(mountpoint).encode() in argv:
            pids.append(int(entry))
    return pids


def stop_and_unmount(mountpoint: Path) -> None:
    """Teardown: end any fuse-crypt daemon still serving ``mountpoint``, then unmount it."""
    for pid in daemon_pids(mountpoint):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    force_unmount(mountpoint)
