"""Mount daemon lifecycle through the real ``fuse-crypt`` command.

Daemonizing, the readiness pipe (success and failure), read-only mounts, SIGTERM,
SIGKILL leaving a dead mount that ``unmount`` or the next ``mount`` cleans up, tampered
ciphertext answering EIO, and the Prometheus endpoint.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fuse_crypt.daemon import wait_until
from tests.fuse_crypt.cli_helpers import (
    FC,
    assert_one_line_error,
    daemon_pids,
    fc,
    free_port,
    is_mounted,
    scrape_metrics,
)
from tests.fuse_env import needs_fuse

pytestmark = [
    needs_fuse,
    pytest.mark.timeout(120),
]


# Poll until true or the time is up (fuse_crypt.daemon's own helper).
wait_for = functools.partial(wait_until, timeout=10.0)


def stat_errno(path: Path) -> int:
    try:
        os.stat(path)
    except OSError as e:
        return e.errno
    return 0


def mount(cipherdir: Path, mountpoint: Path, passfile: Path, *extra: str) -> None:
    proc = fc("mount", "--passfile", passfile, *extra, cipherdir, mountpoint)
    assert proc.returncode == 0, proc.stderr
    assert is_mounted(mountpoint)


# --------------------------------------------------------------------------- daemon


def test_daemon_detaches_and_holds_no_caller_pipes(
    cipherdir: Path, mountpoint: Path, passfile: Path
) -> None:
    # capture_output=True would hang until timeout if the daemon kept our stdout/stderr.
    t0 = time.monotonic()
    mount(cipherdir, mountpoint, passfile)
    assert time.monotonic() - t0 < 30
    pids = daemon_pids(mountpoint)
    assert len(pids) == 1
    with open(f"/proc/{pids[0]}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    assert int(fields[3]) == pids[0] or int(fields[1]) != os.getpid()  # own session, detached
    assert fc("unmount", mountpoint).returncode == 0
    assert wait_for(lambda: not daemon_pids(mountpoint)), "daemon did not exit after unmount"


def test_read_only_mount(cipherdir: Path, mountpoint: Path, passfile: Path) -> None:
    mount(cipherdir, mountpoint, passfile)
    (mountpoint / "existing").write_text("before ro")
    assert fc("unmount", mountpoint).returncode == 0
    mount(cipherdir, mountpoint, passfile, "--ro")
    assert (mountpoint / "existing").read_text() == "before ro"
    for action in (
        lambda: (mountpoint / "new").write_text("x"),
        lambda: (mountpoint / "existing").write_text("changed"),
        lambda: (mountpoint / "dir").mkdir(),
        lambda: (mountpoint / "existing").unlink(),
        lambda: os.rename(mountpoint / "existing", mountpoint / "renamed"),
    ):
        with pytest.raises(OSError) as info:
            action()
        assert info.value.errno == errno.EROFS
    assert (mountpoint / "existing").read_text() == "before ro"


def test_allow_other_reaches_the_kernel(cipherdir: Path, mountpoint: Path, passfile: Path) -> None:
    mount(cipherdir, mountpoint, passfile, "--allow-other")
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        (line,) = [ln for ln in f if ln.split(" ")[4] == str(mountpoint)]
    super_opts = line.rstrip("\n").split(" - ", 1)[1].split(" ")[2]
    assert "allow_other" in super_opts.split(",")
    assert "default_permissions" in super_opts.split(",")


def test_unmount_of_a_busy_live_mount_fails_loudly(
    cipherdir: Path, mountpoint: Path, passfile: Path
) -> None:
    mount(cipherdir, mountpoint, passfile)
    (mountpoint / "open").write_text("held open")
    with open(mountpoint / "open", encoding="utf-8") as held:
        msg = assert_one_line_error(fc("unmount", mountpoint), 10)
        assert "busy" in msg.lower()
        assert is_mounted(mountpoint) and held.read() == "held open"
    assert fc("unmount", mountpoint).returncode == 0
    assert not is_mounted(mountpoint)


def test_already_mounted_is_refused(cipherdir: Path, mountpoint: Path, passfile: Path) -> None:
    mount(cipherdir, mountpoint, passfile)
    msg = assert_one_line_error(fc("mount", "--passfile", passfile, cipherdir, mountpoint), 10)
    assert "already mounted" in msg
    assert len(daemon_pids(mountpoint)) == 1


def test_child_failure_is_reported_through_readiness_pipe(
    cipherdir: Path, mountpoint: Path, passfile: Path
) -> None:
    # Occupy a port so the daemon child fails after the fork, before mounting.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        proc = fc(
            "mount",
            "--passfile",
            passfile,
            "--metrics-addr",
            f"127.0.0.1:{port}",
            cipherdir,
            mountpoint,
        )
    msg = assert_one_line_error(proc, 11)
    assert "metrics" in msg and "in use" in msg
    assert not is_mounted(mountpoint)
    assert wait_for(lambda: not daemon_pids(mountpoint))


def test_missing_root_diriv_fails_cleanly(
    cipherdir: Path, mountpoint: Path, passfile: Path
) -> None:
    (cipherdir / "gocryptfs.diriv").unlink()
    proc = fc("mount", "--passfile", passfile, cipherdir, mountpoint)
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1 and "diriv" in proc.stderr
    assert not is_mounted(mountpoint)


def test_sigterm_unmounts_cleanly(cipherdir: Path, mountpoint: Path, passfile: Path) -> None:
    mount(cipherdir, mountpoint, passfile)
    (mountpoint / "f").write_text("data")
    (pid,) = daemon_pids(mountpoint)
    os.kill(pid, signal.SIGTERM)
    assert wait_for(lambda: not is_mounted(mountpoint)), "SIGTERM did not unmount"
    assert wait_for(lambda: not daemon_pids(mountpoint))
    mount(cipherdir, mountpoint, passfile)
    assert (mountpoint / "f").read_text() == "data"


# --------------------------------------------------------------------------- dead mounts


def _kill_daemon(mountpoint: Path) -> None:
    (pid,) = daemon_pids(mountpoint)
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: stat_errno(mountpoint) == errno.ENOTCONN), "no dead mount after SIGKILL"
    assert is_mounted(mountpoint)


def test_sigkill_then_unmount_cleans_dead_mount(
    cipherdir: Path, mountpoint: Path, passfile: Path
) -> None:
    mount(cipherdir, mountpoint, passfile)
    (mountpoint / "f").write_text("before the crash")
    _kill_daemon(mountpoint)
    proc = fc("unmount", mountpoint)
    assert proc.returncode == 0, proc.stderr
    assert not is_mounted(mountpoint)
    assert stat_errno(mountpoint) == 0
    mount(cipherdir, mountpoint, passfile)
    assert (mountpoint / "f").read_text() == "before the crash"


def test_sigkill_then_mount_again_cleans_up_first(
    cipherdir: Path, mountpoint: Path, passfile: Path
) -> None:
    mount(cipherdir, mountpoint, passfile)
    (mountpoint / "f").write_text("still here")
    _kill_daemon(mountpoint)
    proc = fc("mount", "--passfile", passfile, cipherdir, mountpoint)
    assert proc.returncode == 0, proc.stderr
    assert (mountpoint / "f").read_text() == "still here"
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        assert sum(line.split(" ")[4] == str(mountpoint) for line in f) == 1, "stacked mounts left"


@contextlib.contextmanager
def foreground_mount(
    flag: str, cipherdir: Path, mountpoint: Path, passfile: Path
) -> Iterator[subprocess.Popen[str]]:
    """``fuse-crypt mount <flag>`` running in the foreground, past its ready line."""
    proc = subprocess.Popen(
        [*FC, "mount", flag, "--passfile", str(passfile), str(cipherdir), str(mountpoint)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "Filesystem mounted and ready."
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_foreground_mount_and_sigkill(cipherdir: Path, mountpoint: Path, passfile: Path) -> None:
    with foreground_mount("--foreground", cipherdir, mountpoint, passfile) as proc:
        assert is_mounted(mountpoint)
        (mountpoint / "fg").write_text("foreground")
        proc.kill()
        proc.wait(10)
        assert wait_for(lambda: stat_errno(mountpoint) == errno.ENOTCONN)
        assert fc("unmount", mountpoint).returncode == 0
        assert not is_mounted(mountpoint)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_foreground_signal_unmounts_and_exits_0(
    cipherdir: Path, mountpoint: Path, passfile: Path, sig: int
) -> None:
    with foreground_mount("-f", cipherdir, mountpoint, passfile) as proc:
        (mountpoint / "f").write_text("flushed before exit")
        proc.send_signal(sig)
        assert proc.wait(20) == 0, proc.stderr.read() if proc.stderr else ""
        assert not is_mounted(mountpoint)
    mount(cipherdir, mountpoint, passfile)
    assert (mountpoint / "f").read_text() == "flushed before exit"


# --------------------------------------------------------------------------- integrity, metrics


def _cipher_files(cipherdir: Path) -> list[Path]:
    return [
        p
        for p in cipherdir.rglob("*")
        if p.is_file() and not p.name.startswith("gocryptfs.") and p.stat().st_size > 18
    ]


def test_tampered_block_reads_as_eio(cipherdir: Path, mountpoint: Path, passfile: Path) -> None:
    mount(cipherdir, mountpoint, passfile)
    data = os.urandom(3 * 4096)
    (mountpoint / "victim").write_bytes(data)
    assert fc("unmount", mountpoint).returncode == 0
    (cfile,) = _cipher_files(cipherdir)
    raw = bytearray(cfile.read_bytes())
    raw[18 + 4128 + 100] ^= 0x01  # one bit in block 1's ciphertext
    os.chmod(cfile, 0o600)
    cfile.write_bytes(bytes(raw))
    mount(cipherdir, mountpoint, passfile)
    with open(mountpoint / "victim", "rb") as f:
        assert f.read(4096) == data[:4096]  # block 0 is intact
        with pytest.raises(OSError) as info:
            f.read(4096)
        assert info.value.errno == errno.EIO


def test_metrics_endpoint(cipherdir: Path, mountpoint: Path, passfile: Path) -> None:
    port = free_port()
    mount(cipherdir, mountpoint, passfile, "--metrics-addr", f"127.0.0.1:{port}")
    payload = os.urandom(10000)
    (mountpoint / "m").write_bytes(payload)
    with open(mountpoint / "m", "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        assert f.read() == payload
    m = scrape_metrics(port)
    info = [k for k in m if k.startswith("fuse_crypt_mount_info{")]
    assert info and f'mountpoint="{mountpoint}"' in info[0]
    assert m["fuse_crypt_uptime_seconds"] > 0
    assert m["fuse_crypt_cipher_bytes_written_total"] >= 10000 + 18 + 3 * 32
    assert m["fuse_crypt_blocks_encrypted_total"] >= 3
    assert m["fuse_crypt_auth_failures_total"] == 0
    assert any(k.startswith("fuse_crypt_backend_ops_total{") for k in m)
    # Corrupt the file behind the daemon's back: the failure is counted and is EIO.
    (cfile,) = _cipher_files(cipherdir)
    raw = bytearray(cfile.read_bytes())
    raw[40] ^= 0xFF
    os.chmod(cfile, 0o600)
    cfile.write_bytes(bytes(raw))
    with open(mountpoint / "m", "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        with pytest.raises(OSError) as e:
            f.read()
        assert e.value.errno == errno.EIO
    m = scrape_metrics(port)
    assert m["fuse_crypt_auth_failures_total"] >= 1
    assert m["fuse_crypt_blocks_decrypted_total"] >= 3


def test_mountpoint_with_space_and_backslash(
    cipherdir: Path, passfile: Path, tmp_path: Path
) -> None:
    from fuse_crypt.daemon import find_mount, is_live_mount

    odd = tmp_path / "mount point\\with odd\tchars"
    odd.mkdir()
    try:
        proc = fc("mount", "--passfile", passfile, cipherdir, odd)
        assert proc.returncode == 0, proc.stderr
        entry = find_mount(str(odd))  # mountinfo escapes these as \040 \134 \011
        assert entry is not None and entry.fstype.startswith("fuse")
        assert is_live_mount(str(odd))
        (odd / "x").write_text("ok")
        assert fc("unmount", odd).returncode == 0
        assert find_mount(str(odd)) is None
    finally:
        if find_mount(str(odd)) is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(odd)], capture_output=True, check=False)


# --------------------------------------------------------------------------- readiness protocol


def _daemonized(body, timeout: float = 20.0) -> None:
    from fuse_crypt.daemon import run_daemonized

    run_daemonized(body, timeout=timeout)


def test_protocol_ready_returns(tmp_path: Path) -> None:
    marker = tmp_path / "child-ran"

    def body(notifier) -> int:
        marker.write_text(str(os.getpid()))
        notifier.ready()
        return 0

    _daemonized(body)
    assert wait_for(marker.exists)
    assert int(marker.read_text()) != os.getpid()


def test_protocol_error_keeps_code_and_message() -> None:
    from fuse_crypt.cli.exitcodes import CliError
    from fuse_crypt.daemon import DaemonError

    def body(notifier) -> int:
        raise CliError("config file broken\nsecond line folded", 23)

    with pytest.raises(DaemonError) as info:
        _daemonized(body)
    assert info.value.code == 23
    assert str(info.value) == "config file broken second line folded"


def test_protocol_silent_death_reports_status() -> None:
    from fuse_crypt.daemon import DaemonError

    def body(notifier) -> int:
        os._exit(5)

    with pytest.raises(DaemonError) as info:
        _daemonized(body)
    assert info.value.code == 19
    assert "exited with status 5" in str(info.value)


def test_protocol_return_without_ready() -> None:
    from fuse_crypt.daemon import DaemonError

    with pytest.raises(DaemonError) as info:
        _daemonized(lambda notifier: 0)
    assert info.value.code == 19
    assert "before the mount became ready" in str(info.value)


def test_protocol_timeout_stops_child(tmp_path: Path) -> None:
    from fuse_crypt.daemon import DaemonError

    pidfile = tmp_path / "pid"

    def body(notifier) -> int:
        pidfile.write_text(str(os.getpid()))
        time.sleep(30)
        return 0

    t0 = time.monotonic()
    with pytest.raises(DaemonError) as info:
        _daemonized(body, timeout=1.0)
    assert time.monotonic() - t0 < 10
    assert "did not become ready" in str(info.value)
    pid = int(pidfile.read_text())
    assert wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout=5)
