"""In-memory stand-ins at the node core's seams: the mount table and a mounter.

With these a NodeCore runs in-process without root, FUSE or daemons: a "daemon" is an
entry in ``FakeMountTable.procs``, a "mount" an entry in ``FakeMountTable.entries``;
directories (targets, cipher dirs, the state dir) stay real files under a tmp dir, so the
core's own mkdir/rmdir/state-file code runs for real. A test "kills the plugin" by dropping
its NodeCore and building another on the same state dir and the same table: the mounts and
daemons outlive the plugin, as they do on a node.
"""

from __future__ import annotations

import errno
import itertools
import os
import subprocess
from dataclasses import dataclass, field

from csi_driver.deadline import Deadline
from csi_driver.keys import VolumeKey
from csi_driver.mounter import CONF_NAME, Mounter
from csi_driver.mounts import MountBusy, MountEntry, MountTable

# Beyond any kernel's pid_max: a fake pid never names a real process.
FIRST_FAKE_PID = 10_000_000
FAKE_FS = "fuse.fake-crypt"


@dataclass
class FakeMountTable(MountTable):
    entries: dict[str, MountEntry] = field(default_factory=dict)
    owner: dict[str, int] = field(default_factory=dict)  # mount point -> daemon pid
    procs: dict[int, str] = field(default_factory=dict)  # live daemon pid -> its target
    states: dict[str, str] = field(default_factory=dict)  # probe answer if not "live"
    busy: set[str] = field(default_factory=set)  # mounts a "pod process" still holds
    _pids: itertools.count = field(default_factory=lambda: itertools.count(FIRST_FAKE_PID))

    # -- what a daemon does --------------------------------------------------------------

    def mount(self, target: str, source: str) -> int:
        pid = next(self._pids)
        self.entries[target] = MountEntry(target, FAKE_FS, source, "rw")
        self.owner[target] = pid
        self.procs[pid] = target
        return pid

    def kill(self, pid: int) -> None:
        """The daemon dies; its mount stays, dead (ENOTCONN), as a FUSE mount does."""
        target = self.procs.pop(pid, None)
        if target is not None and self.owner.get(target) == pid:
            self.states[target] = "dead"

    def daemons(self) -> dict[int, str]:
        return dict(self.procs)

    # -- MountTable ----------------------------------------------------------------------

    def all(self) -> dict[str, MountEntry]:
        return dict(self.entries)

    def find(self, target: str) -> MountEntry | None:
        return self.entries.get(target)

    def detach(self, target: str, *, lazy: bool = False) -> None:
        if self.entries.pop(target, None) is None:
            raise OSError(errno.EINVAL, f"{target} is not mounted")
        self.states.pop(target, None)
        pid = self.owner.pop(target, None)
        self.procs.pop(pid, None)  # a FUSE daemon exits when its mount goes

    def unmount(self, target: str, *, lazy: bool = False) -> None:
        if target in self.entries:
            if target in self.busy and not lazy:
                raise MountBusy(target, 0)  # the real table waits BUSY_WAIT first
            self.detach(target, lazy=lazy)

    def probe(self, target: str, timeout: float) -> str:
        if target in self.entries:
            return self.states.get(target, "live")
        return "live" if os.path.exists(target) else "error"

    def statvfs(self, target: str, timeout: float) -> os.statvfs_result:
        if self.states.get(target) == "dead":
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")
        return os.statvfs(os.path.dirname(target))


class FakeProc:
    def __init__(self, table: FakeMountTable, pid: int) -> None:
        self.table, self.pid = table, pid

    def poll(self) -> int | None:
        return None if self.pid in self.table.procs else -1

    def wait(self, timeout: float | None = None) -> int:
        if self.poll() is None:
            raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
        return -1


class FakeMounter(Mounter):
    """Mounts into a FakeMountTable; ``init`` writes a stand-in gocryptfs.conf."""

    name = "fake"
    fs_type = FAKE_FS

    def __init__(self, table: FakeMountTable) -> None:
        self.table = table
        self.fail_next: str | None = None  # "exit" or "hang": the next daemon misbehaves

    def _bin(self) -> str:
        return "fake"

    def _init(self, cipher_dir: str, key: VolumeKey, deadline: Deadline) -> None:
        with open(os.path.join(cipher_dir, CONF_NAME), "w") as f:
            f.write("{}")

    def command(
        self,
        cipher_dir: str,
        target: str,
        *,
        readonly: bool,
        allow_other: bool,
        capacity: int = 0,
        metrics_addr: str | None = None,
    ) -> list[str]:
        return ["fake", cipher_dir, target, "ro" if readonly else "rw"]

    def stdin_for(self, cipher_dir: str, key: VolumeKey) -> bytes:
        return b""

    def spawn(self, argv: list[str], stdin_data: bytes, log_path: str) -> FakeProc:
        _, cipher_dir, target, _ = argv
        mode, self.fail_next = self.fail_next, None
        if mode == "exit":
            return FakeProc(self.table, -1)  # died at once, never mounted
        pid = self.table.mount(target, cipher_dir)
        if mode != "hang":
            with open(log_path, "ab") as f:
                f.write(self.READY_LINE + b"\n")
        return FakeProc(self.table, pid)

    def attach(self, pid: int, started: int) -> FakeProc:
        return FakeProc(self.table, pid)

    def start_time(self, pid: int) -> int:
        return pid - FIRST_FAKE_PID + 1 if pid in self.table.procs else 0

    def serves(self, pid: int, target: str, started: int) -> bool:
        return self.table.procs.get(pid) == target and self.start_time(pid) == started
