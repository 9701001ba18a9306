"""csi_driver.proc: the one home of /proc parsing, liveness, identity and log tails."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys

from hypothesis import given
from hypothesis import strategies as st

from csi_driver import proc
from fuse_crypt.daemon import wait_until
from tests.fuzzing import fuzz, long_fuzz


def _child(*code: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "; ".join(code)], start_new_session=True)


def test_start_time_and_liveness_of_a_child() -> None:
    p = _child("import time", "time.sleep(30)")
    try:
        started = proc.start_time(p.pid)
        assert started > 0 and proc.alive(p.pid)
        watched = proc.PidProcess(p.pid)
        assert watched.poll() is None
    finally:
        p.kill()
    # Killed but not reaped: a zombie counts as dead everywhere.
    watched.wait(timeout=5)
    assert not proc.alive(p.pid)
    assert proc.start_time(p.pid) == 0
    p.wait()
    assert not proc.alive(p.pid) and proc.start_time(p.pid) == 0


def test_a_reused_pid_is_not_the_recorded_process() -> None:
    """A record's start time that does not match is another process, whatever the pid."""
    me = os.getpid()
    assert proc.PidProcess(me, started=proc.start_time(me) + 1).poll() == -1
    assert proc.PidProcess(me).poll() is None


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read()


def test_command_names_with_parentheses_and_spaces() -> None:
    """The name field may hold ') ' itself: fields are taken after the last ')'."""
    p = _child(
        "import ctypes, time",
        "ctypes.CDLL(None).prctl(15, b'a) b) Z 1', 0, 0, 0)",
        "time.sleep(30)",
    )
    try:
        # The child renames itself once its interpreter has started.
        assert wait_until(lambda: _comm(p.pid).startswith("a) b"), timeout=20), (
            "the child never renamed itself"
        )
        fields = proc.stat_fields(p.pid)
        assert fields is not None and fields[0] in "RSD"
        assert proc.alive(p.pid) and proc.start_time(p.pid) > 0
    finally:
        p.kill()
        p.wait()


def test_serves_refuses_pid_1_ourselves_and_plain_processes() -> None:
    p = _child("import time", "time.sleep(30)")
    try:
        assert not proc.serves(1, "/x", proc.start_time(1))
        assert not proc.serves(os.getpid(), "/x", proc.start_time(os.getpid()))
        # A session leader, alive, right start time, but no /dev/fuse: not a daemon of ours.
        assert not proc.serves(p.pid, "/x", proc.start_time(p.pid))
        assert not proc.serves(0, "/x") and not proc.serves(-5, "/x")
    finally:
        p.kill()
        p.wait()


def test_gone_and_odd_pids() -> None:
    assert proc.stat_fields(2**22 + 12345) is None
    assert proc.start_time(2**22 + 12345) == 0
    assert not proc.alive(0) and not proc.alive(-1)


def test_tail_keeps_last_lines_on_one_bounded_line() -> None:
    assert proc.tail("a\n\n b \nc\nd\n") == "b | c | d"
    assert proc.tail("") == ""
    assert len(proc.tail("x" * 5000)) == 400


def test_parse_stat() -> None:
    line = b"42 (a) b) Z 1) S 1 42 42 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 777 0 0\n"
    fields = proc.parse_stat(line)
    assert fields is not None and fields[0] == "S" and fields[19] == "777"
    assert proc.parse_stat(b"no paren") is None


@long_fuzz
@fuzz(quick=200)
@given(st.binary(max_size=600))
def test_parse_stat_never_fails(raw: bytes) -> None:
    fields = proc.parse_stat(raw)
    assert fields is None or all(isinstance(f, str) for f in fields)


@long_fuzz
@fuzz(quick=200)
@given(st.text(max_size=2000))
def test_tail_never_fails(text: str) -> None:
    out = proc.tail(text)
    assert len(out) <= 400 and "\n" not in out


_LISTENER = """
import socket, sys, time
socks = []
for host in sys.argv[1:]:
    s = socket.socket()
    s.bind((host, 0))
    s.listen()
    socks.append(s)
    print(s.getsockname()[1], flush=True)
time.sleep(60)
"""


def _listener(*hosts: str) -> tuple[subprocess.Popen[str], list[int]]:
    child = subprocess.Popen(
        [sys.executable, "-c", _LISTENER, *hosts], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    return child, [int(child.stdout.readline()) for _ in hosts]


def test_loopback_listen_port_is_the_one_the_process_holds() -> None:
    """The daemon's port comes from the kernel: a port this process (not the child) listens
    on, one on another address, and several at once are never taken for it."""
    from csi_driver.proc import loopback_listen_port

    with socket.socket() as mine:
        mine.bind(("127.0.0.1", 0))
        mine.listen()
        child, (port,) = _listener("127.0.0.1")
        try:
            assert loopback_listen_port(child.pid) == port != mine.getsockname()[1]
        finally:
            child.kill()
            child.wait()
    assert loopback_listen_port(child.pid) is None  # gone
    child, _ = _listener("0.0.0.0")
    try:
        assert loopback_listen_port(child.pid) is None  # not loopback: not a daemon's
    finally:
        child.kill()
        child.wait()
    child, _ = _listener("127.0.0.1", "127.0.0.1")
    try:
        assert loopback_listen_port(child.pid) is None  # two: no guessing
    finally:
        child.kill()
        child.wait()


def test_parse_tcp_listeners() -> None:
    from csi_driver.proc import parse_tcp_listeners

    head = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when ... inode\n"
    # As the kernel prints it: the network-order address read as a native 32-bit word.
    lo_hex = f"{struct.unpack('=I', socket.inet_aton('127.0.0.1'))[0]:08X}"
    rows = [
        f"   0: {lo_hex}:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 111 1",
        f"   1: {lo_hex}:1F91 0100007F:D000 01 00000000:00000000 00:00000000 00000000 0 0 112 1",
        "   2: 00000000:1F92 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 113 1",
        f"   3: {lo_hex}:1F93 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 999 1",
        "   4: garbage",
        f"   5: {lo_hex}:ZZZZ 00000000:0000 0A 0 0 0 0 0 114 1",
    ]
    table = head + "\n".join(rows)
    assert parse_tcp_listeners(table, {111, 112, 113, 114}) == [0x1F90]
    assert parse_tcp_listeners(table, set()) == []
