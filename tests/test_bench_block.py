"""bench/block_vs_ext4.py still runs: a tiny run on real loop devices, FUSE and mounts.

The benchmark is how issue 11's figures are produced and is not imported by anything else,
so nothing but this would notice it rotting (a renamed node-core API, a workload that no
longer matches the table). It asserts only what a run must always print and leave behind,
never a figure: timings belong to the benchmark, not to the test suite.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuse_crypt.block_rig import block_skip_reason
from tests.fuse_env import fuse_skip_reason

BENCH = Path(__file__).resolve().parent.parent / "bench" / "block_vs_ext4.py"
HALT_POLL = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")

pytestmark = pytest.mark.skipif(
    (block_skip_reason() or fuse_skip_reason()) is not None,
    reason=str(block_skip_reason() or fuse_skip_reason()),
)


def _loops_under(work: Path) -> list[str]:
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if str(work) in line]


def test_a_tiny_run_prints_every_row_and_leaves_nothing_behind(tmp_path: Path) -> None:
    argv = [sys.executable, str(BENCH), "--size-mib", "8", "--files", "40", "--reads", "1",
            "--rounds", "1", "--pairs", "2", "--workdir", str(tmp_path)]  # fmt: skip
    if HALT_POLL.exists():  # the option's set-and-restore path, with the value it has now
        argv += ["--guest-halt-poll-ns", HALT_POLL.read_text().strip()]
    before = HALT_POLL.read_text() if HALT_POLL.exists() else None
    res = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {line.split(" | ")[0].lstrip("| ") for line in res.stdout.splitlines()
            if line.startswith("| ")}  # fmt: skip
    for row in ("seq write MB/s", "seq read MB/s", "small create+sync files/s",
                "small read files/s", "small create+sync files/s, 2 ABBA pairs",
                "small read files/s, 2 ABBA pairs", "daemon peak RSS MiB",
                "NodeStageVolume p50 s (1 runs)",
                "NodeStageVolume p50 s, new volume (format + mkfs)"):  # fmt: skip
        assert row in rows, res.stdout
    assert res.stdout.count("[pair ") == 2
    assert list(tmp_path.iterdir()) == []  # its work directory is gone
    assert _loops_under(tmp_path) == []
    if before is not None:
        assert HALT_POLL.read_text() == before
