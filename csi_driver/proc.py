"""Processes by pid: /proc parsing, liveness, identity and log tails, in one place.

Mount daemons outlive the plugin that started them (their own session), and a restarted
plugin only knows them by the pid in its state file, which the host can edit. So a pid is
never trusted alone: pid + start time identifies a process for good (pids are reused,
start times are not), and a daemon we adopt must look like one of ours.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
from typing import Protocol

# /proc/<pid>/stat is one short line; a bound keeps a weird kernel from costing memory.
_STAT_LIMIT = 4096
# /proc/<pid>/net/tcp: ~150 bytes a socket; 8 MiB is ~55,000 sockets in the namespace.
_TCP_LIMIT = 8 << 20
_FD_LIMIT = 4096
_TCP_LISTEN = "0A"


class Proc(Protocol):
    """What the supervisor needs of a daemon process (subprocess.Popen fits)."""

    pid: int

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...


def parse_stat(raw: bytes) -> list[str] | None:
    """Fields of a /proc/<pid>/stat line after the command name (field 3, state, first).

    The name is skipped by the *last* ')': a process chooses its own name, spaces and
    parentheses included. None if there is no ')'.
    """
    _, sep, rest = raw.rpartition(b")")
    if not sep:
        return None
    return rest.decode("ascii", "replace").split()


def stat_fields(pid: int) -> list[str] | None:
    """parse_stat of /proc/<pid>/stat; None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read(_STAT_LIMIT)
    except OSError:
        return None
    return parse_stat(raw)


def start_time(pid: int) -> int:
    """Start time (clock ticks since boot) of a live, non-zombie ``pid``; 0 if gone."""
    fields = stat_fields(pid)
    if not fields or len(fields) < 20 or fields[0] == "Z":
        return 0
    try:
        return int(fields[19])
    except ValueError:
        return 0


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (a zombie is dead for our purposes)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = stat_fields(pid)
    return fields is not None and len(fields) > 0 and fields[0] != "Z"


def holds_fuse_device(pid: int) -> bool:
    """True if ``pid`` has /dev/fuse open: only FUSE daemons do."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return False
    for name in names[:4096]:
        try:
            if os.readlink(os.path.join(fd_dir, name)) == "/dev/fuse":
                return True
        except OSError:
            continue
    return False


def _socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets ``pid`` holds open (its /proc/<pid>/fd links)."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return set()
    inodes: set[int] = set()
    for name in names[:_FD_LIMIT]:
        try:
            link = os.readlink(os.path.join(fd_dir, name))
        except OSError:
            continue
        if link.startswith("socket:[") and link.endswith("]") and link[8:-1].isdigit():
            inodes.add(int(link[8:-1]))
    return inodes


def parse_tcp_listeners(table: str, inodes: set[int], host: str = "127.0.0.1") -> list[int]:
    """Ports of the IPv4 sockets in ``table`` (a /proc/net/tcp text) that listen on exactly
    ``host`` and whose inode is in ``inodes``."""
    want = socket.inet_aton(host)
    ports: list[int] = []
    for line in table.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 10 or cols[3] != _TCP_LISTEN:
            continue
        addr, _, port = cols[1].partition(":")
        try:
            # The kernel prints the address as one native-endian 32-bit word.
            ip = struct.pack("=I", int(addr, 16))
            inode = int(cols[9])
            number = int(port, 16)
        except (ValueError, struct.error):
            continue
        if ip == want and inode in inodes:
            ports.append(number)
    return ports


def loopback_listen_port(pid: int) -> int | None:
    """The one TCP port ``pid`` listens on at 127.0.0.1, from the kernel's tables (None if
    it has none, or several: then which is which is a guess we do not make).

    How the node plugin finds a daemon started with ``--metrics-addr 127.0.0.1:0``, and one
    it adopted after a restart: nothing to record in the hostPath state file, which the host
    could edit to point the plugin's scrapes at another local service. Only a socket the
    daemon itself holds counts, in the daemon's own network namespace."""
    inodes = _socket_inodes(pid)
    if not inodes:
        return None
    try:
        with open(f"/proc/{pid}/net/tcp", encoding="ascii", errors="replace") as f:
            table = f.read(_TCP_LIMIT)
    except OSError:
        return None
    ports = parse_tcp_listeners(table, inodes)
    return ports[0] if len(ports) == 1 else None


def serves(pid: int, target: str, started: int = 0) -> bool:
    """Whether ``pid`` is (still) the FUSE daemon a state record says it is.

    A forged record must not make the plugin adopt, and later SIGKILL, an unrelated process
    (pid 1, the plugin itself). So: never 1 or ourselves, a session leader (every daemon
    gets its own session), holding /dev/fuse, and with the recorded start time when one is
    known; without one, argv must name the target.
    """
    if pid <= 1 or pid == os.getpid() or not alive(pid):
        return False
    try:
        if os.getsid(pid) != pid:
            return False
    except OSError:
        return False
    if not holds_fuse_device(pid):
        return False
    if started:
        return start_time(pid) == started
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read(64 * 1024).split(b"\0")
    except OSError:
        return False
    return os.fsencode(target) in argv


class PidProcess:
    """A process that is not our child (forked by the zygote, or left by a previous plugin
    instance): watched by pid + start time."""

    def __init__(self, pid: int, started: int | None = None) -> None:
        self.pid = pid
        self.start_time = start_time(pid) if started is None else started

    def poll(self) -> int | None:
        live = self.start_time and start_time(self.pid) == self.start_time
        return None if live else -1

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
            time.sleep(0.005)
        return -1


def tail(text: str, lines: int = 3, limit: int = 400) -> str:
    """The last non-blank ``lines`` of a daemon's output on one line, for an error message."""
    kept = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(kept[-lines:])[:limit]
