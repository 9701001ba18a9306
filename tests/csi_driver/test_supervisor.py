"""csi_driver/supervisor.py with real daemon processes: started, watched, restarted, stopped.

The "daemons" are real child processes in their own session (a small Python program that
reads its key from stdin, says it is ready and sleeps); only the mount table is the
in-process fake of fakes.py, so no FUSE or root is needed. What is checked is the
supervisor's own job: a daemon that dies while the plugin holds its key comes back (with the
same key, its new pid in the store at once), a crash loop or a keyless adopted daemon is
left down and cleaned up, and stop/start failures leave no process behind.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import signal
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_driver import errors, supervisor
from csi_driver.core.store import INTENT, MOUNTED, Publication, PublicationStore
from csi_driver.deadline import Deadline
from csi_driver.keys import VolumeKey
from csi_driver.mounter import Mounter
from csi_driver.mounts import MountEntry
from csi_driver.proc import Proc, alive
from csi_driver.supervisor import MAX_RESTARTS, MountSupervisor
from fuse_crypt.daemon import wait_until

from .fakes import FakeMountTable

KEY = VolumeKey(b"supervised-volume-key", "kbs-derived", 10)

# The daemon: key from stdin (its digest into a file the test reads), ready line, sleep.
_DAEMON = r"""
import hashlib, os, sys, time
key = sys.stdin.buffer.read()
with open(sys.argv[2] + f"/{os.getpid()}.key", "w") as f:
    f.write(hashlib.sha256(key).hexdigest())
mode = sys.argv[3]
if mode == "die":
    print("cannot open the volume: bad things", flush=True)
    sys.exit(7)
if mode != "mute":
    print("Filesystem mounted and ready.", flush=True)
time.sleep(600)
"""


class _Table(FakeMountTable):
    """The fake table, but unmounting ends the real daemon (as a FUSE daemon exits)."""

    def __init__(self) -> None:
        super().__init__()
        self.daemon_of: dict[str, int] = {}

    def detach(self, target: str, *, lazy: bool = False) -> None:
        super().detach(target, lazy=lazy)
        pid = self.daemon_of.pop(target, None)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


class ProcessMounter(Mounter):
    """Spawns the real daemon above; the mount appears in the fake table as it starts."""

    name = "proc"
    fs_type = "fuse.proc"

    def __init__(self, table: _Table, keydir: Path) -> None:
        self.table = table
        self.keydir = keydir
        self.mode = "ready"

    def _bin(self) -> str:
        return sys.executable

    def _init(self, cipher_dir: str, key: VolumeKey, deadline: Deadline) -> None:
        raise AssertionError("not used")

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
        return [sys.executable, "-c", _DAEMON, target, str(self.keydir), self.mode]

    def stdin_for(self, cipher_dir: str, key: VolumeKey) -> bytes:
        return key.password

    def spawn(self, argv: list[str], stdin_data: bytes, log_path: str) -> Proc:
        proc = super().spawn(argv, stdin_data, log_path)
        target = argv[3]
        if argv[-1] != "die":
            self.table.entries[target] = MountEntry(target, self.fs_type, "src", "rw")
            self.table.daemon_of[target] = proc.pid
        return proc

    def key_digest(self, pid: int) -> str:
        path = self.keydir / f"{pid}.key"
        assert _wait(path.exists), f"daemon {pid} never read its key"
        return path.read_text()


# Poll until true or the time is up (fuse_crypt.daemon's own helper).
_wait = functools.partial(wait_until, timeout=10.0)


class World:
    def __init__(self, tmp: Path) -> None:
        self.table = _Table()
        (tmp / "keys").mkdir()
        (tmp / "state").mkdir()
        self.mounter = ProcessMounter(self.table, tmp / "keys")
        self.store = PublicationStore(str(tmp / "state"))
        self.changes = 0
        self.restarts = 0
        self.sup = MountSupervisor(
            {"proc": self.mounter},
            str(tmp / "logs"),
            self.store,
            mounts=self.table,
            on_change=self._changed,
            on_restart=self._restarted,
            monitor_interval=0.05,
        )
        self.target = str(tmp / "target")
        self.pub = Publication("vol-1", self.target, str(tmp / "cipher"), "proc", False, 1)

    def _changed(self) -> None:
        self.changes += 1

    def _restarted(self) -> None:
        self.restarts += 1

    def publish(self) -> int:
        self.store.put(Publication(**{**self.pub.__dict__, "phase": INTENT}))
        handle = self.sup.start(self.pub, KEY)
        self.store.update(
            self.target,
            phase=MOUNTED,
            pid=handle.pid,
            pid_start=self.mounter.start_time(handle.pid),
        )
        return handle.pid

    def pid(self) -> int:
        pub = self.store.get(self.target)
        assert pub is not None
        return pub.pid


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    # The restart backoff (0.4 s, 0.8 s, ...) shortened: the logic is what is tested here.
    fast = types.SimpleNamespace(monotonic=time.monotonic, sleep=lambda s: time.sleep(min(s, 0.05)))
    monkeypatch.setattr(supervisor, "time", fast)
    w = World(tmp_path)
    yield w
    w.sup.shutdown(unmount=True)
    pids = [int(p.stem) for p in w.mounter.keydir.glob("*.key")]
    left = [pid for pid in pids if alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "a daemon outlived shutdown(unmount=True)"


def test_a_dying_daemon_is_restarted_with_the_key_it_had(world: World) -> None:
    first = world.publish()
    digest = world.mounter.key_digest(first)
    assert digest == hashlib.sha256(KEY.password).hexdigest()
    os.kill(first, signal.SIGKILL)
    assert _wait(lambda: world.pid() != first), "no restart"
    second = world.pid()
    assert alive(second) and os.getsid(second) == second  # its own session again
    assert world.mounter.key_digest(second) == digest
    assert world.store.get(world.target).pid_start == world.mounter.start_time(second)  # type: ignore[union-attr]
    assert world.restarts == 1 and world.changes == 1
    assert world.table.find(world.target) is not None
    handle = world.sup.get(world.target)
    assert handle is not None and handle.pid == second and not handle.dead


def test_a_crash_loop_is_left_down_and_cleaned_up(world: World) -> None:
    world.publish()
    for n in range(MAX_RESTARTS):
        pid = world.pid()
        os.kill(pid, signal.SIGKILL)
        assert _wait(lambda pid=pid: world.pid() != pid), f"restart {n + 1} missing"
    last = world.pid()
    os.kill(last, signal.SIGKILL)
    handle = world.sup.get(world.target)
    assert handle is not None
    assert _wait(lambda: handle.dead), "crash loop not given up"
    assert world.restarts == MAX_RESTARTS
    assert world.table.find(world.target) is None  # the dead mount is detached (no ENOTCONN)
    time.sleep(0.3)
    assert world.pid() == last  # nothing started again


def test_an_adopted_daemon_without_its_key_is_only_cleaned_up(world: World) -> None:
    pid = world.publish()
    world.sup.forget(world.target)  # a new plugin instance: it knows the daemon by pid only
    pub = world.store.get(world.target)
    assert pub is not None
    handle = world.sup.adopt(pub)
    assert handle.key is None and handle.proc.poll() is None
    os.kill(pid, signal.SIGKILL)
    assert _wait(lambda: handle.dead)
    assert world.restarts == 0 and world.table.find(world.target) is None


def test_stop_unmounts_and_the_daemon_is_gone(world: World) -> None:
    pid = world.publish()
    world.sup.stop(world.target)
    assert world.sup.get(world.target) is None
    assert world.table.find(world.target) is None
    assert not alive(pid)
    world.sup.stop(world.target)  # idempotent


def test_a_daemon_that_exits_before_ready_is_a_mount_error_with_its_log(world: World) -> None:
    world.mounter.mode = "die"
    with pytest.raises(errors.MountError, match="code 7.*bad things"):
        world.sup.start(world.pub, KEY)
    assert world.sup.get(world.target) is None


def test_a_daemon_that_never_says_ready_is_killed_at_the_deadline(world: World) -> None:
    world.mounter.mode = "mute"
    started = time.monotonic()
    with pytest.raises(errors.DeadlineExceeded):
        world.sup.start(world.pub, KEY, timeout=0.5)
    assert time.monotonic() - started < 15
    assert world.table.find(world.target) is None  # mounted but silent: detached
    pids = [int(p.stem) for p in world.mounter.keydir.glob("*.key")]
    assert pids and not any(alive(p) for p in pids)
