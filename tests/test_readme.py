"""README.md's commands run as a new user would run them, so the docs cannot drift.

Every fenced ``sh`` block is extracted. The quick tour runs as written, in bash, in an empty
directory whose ``.venv`` is the venv running these tests (the tour starts with
``. .venv/bin/activate``, "after ./run setup"), one step after another, each step's exit
status checked. Two kinds of line are not run verbatim, each for a stated reason:

* the set-up block (``bash ./run demo``, ``bash ./run test``): CI runs both itself, and this
  test is part of ``./run test``;
* the later blocks (building the image, loading it into a registry, installing the chart):
  each command is listed in ``ELSEWHERE`` with the test that covers its code path instead;
* ``coco-csi node`` serves until stopped and needs what only a guest has (a KBS, the
  Attestation Agent's socket, the KBS CA, ``/csi``): it runs with exactly those four values
  replaced by the test KBS (TLS, pinned CA) and AA peers and a socket in a temporary
  directory, must report ready through CSI Probe, and must exit 0 on SIGTERM.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.console_scripts import ROOT
from tests.fuse_env import fuse_skip_reason
from tests.peers.harness import kbs_and_aa

README = ROOT / "README.md"
SET_UP = {
    "bash ./run demo": "CI runs the demo job itself (./run demo)",
    "bash ./run test": "CI runs the suite itself; this test is part of ./run test",
}
# What only a guest has, in the README's `coco-csi node` line → what stands in for it here.
GUEST_ONLY = (
    "unix:///csi/csi.sock",
    "https://kbs.example:8080",
    "unix:///run/confidential-containers/attestation-agent/attestation-agent.sock",
    "/etc/kbs-ca.pem",
)


def sh_blocks(text: str) -> list[list[str]]:
    """The commands of each fenced ``sh`` block: continuation lines joined to their command,
    comment-only lines dropped (a trailing comment stays: bash reads it as one)."""
    blocks = []
    for body in re.findall(r"^```sh\n(.*?)^```", text, re.M | re.S):
        commands: list[str] = []
        pending = ""
        for line in body.splitlines():
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            pending += line + "\n"
            if not line.endswith("\\"):
                commands.append(pending.rstrip("\n"))
                pending = ""
        assert not pending, f"README block ends inside a command: {pending!r}"
        blocks.append(commands)
    return blocks


# Commands of the later blocks (the image and the cluster install) that cannot run in a test
# here, each with what does run its code path instead. A command missing from this table fails
# test_later_blocks_are_accounted_for, so a new README command is either run or explained.
ELSEWHERE = {
    "bash ./run image": "tests/image builds the image with the same tools/image.py and runs it",
    "skopeo copy": "needs a registry; the OCI layout it copies is what tests/image loads",
    "helm install": "needs a cluster; tests/charts renders and lints the chart with these values",
    "kubectl create namespace": "needs a cluster",
    "kubectl apply -f examples/": "needs a cluster; tests/examples validates every example",
}


def _blocks() -> tuple[list[str], list[str]]:
    blocks = sh_blocks(README.read_text())
    assert len(blocks) >= 2, "README.md: expected the set-up block and the quick tour first"
    return blocks[0], blocks[1]


def test_later_blocks_are_accounted_for() -> None:
    later = [c for block in sh_blocks(README.read_text())[2:] for c in block]
    unexplained = [c for c in later if not any(c.startswith(k) for k in ELSEWHERE)]
    assert not unexplained, f"README commands neither run nor explained: {unexplained}"


def test_set_up_block_is_what_ci_runs() -> None:
    setup, _ = _blocks()
    assert [c.split("#")[0].strip() for c in setup] == list(SET_UP)


@pytest.mark.parametrize("command", list(SET_UP))
def test_set_up_command(command: str) -> None:
    pytest.skip(SET_UP[command])


def _venv() -> Path:
    venv = Path(sys.prefix)
    assert (venv / "bin" / "activate").is_file(), f"tests must run in a venv, not {venv}"
    return venv


def _run_steps(steps: list[str], cwd: Path) -> None:
    """Run ``steps`` in one bash, in order; fail naming the first step that failed."""
    script = ["exec 2>&1"]
    for i, step in enumerate(steps):
        script += [step, f"printf '\\n@@step {i} rc=%d\\n' $?"]  # on its own line
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "NODE")}
    env["PATH"] = os.pathsep.join(
        p for p in env["PATH"].split(os.pathsep) if p != str(_venv() / "bin")
    )
    run = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = run.stdout
    start = 0
    for i, step in enumerate(steps):
        m = re.compile(rf"^@@step {i} rc=(\d+)$", re.M).search(out, start)
        assert m, f"step {i} never finished: {step}\n{out[start:]}"
        assert m[1] == "0", (
            f"README step failed (rc={m[1]}):\n{step}\n--- output:\n{out[start : m.start()]}"
        )
        start = m.end()


def _probe_ready(endpoint: str, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    from coco_proto import csi_pb2
    from csi_driver.client import CsiClient

    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"coco-csi node exited: {proc.communicate()[0]}"
        if os.path.exists(endpoint.removeprefix("unix://")):
            with CsiClient(endpoint) as client:
                try:
                    resp = client.identity.Probe(csi_pb2.ProbeRequest(), timeout=5)
                    if resp.ready.value:
                        return
                    last = "not ready"
                except Exception as exc:  # noqa: BLE001 - still starting
                    last = repr(exc)
        time.sleep(0.1)
    pytest.fail(f"coco-csi node never became ready: {last}")


def _run_node(command: str, cwd: Path) -> None:
    """The README's `coco-csi node` line with the guest-only values replaced (see above)."""
    for value in GUEST_ONLY:
        assert value in command, f"README's coco-csi node line no longer names {value}"
    with (
        tempfile.TemporaryDirectory(prefix="readme", dir="/tmp") as sock_dir,
        kbs_and_aa(tls=True) as (kbs, aa),
    ):
        endpoint = f"unix://{sock_dir}/csi.sock"
        for value, stand_in in zip(
            GUEST_ONLY, (endpoint, kbs.url, aa.target, str(kbs.ca_path)), strict=True
        ):
            command = command.replace(value, stand_in)
        proc = subprocess.Popen(
            ["bash", "-c", f". .venv/bin/activate\nexec {command}"],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            _probe_ready(endpoint, proc)
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=30)
            assert proc.returncode == 0, out
            assert "Traceback" not in out
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def test_quick_tour_runs_as_written(tmp_path: Path) -> None:
    reason = fuse_skip_reason(None)
    if reason:
        pytest.skip(f"the tour mounts a volume: {reason}")
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl is missing: the tour's `kubectl create sealedsecret` needs it")
    _, tour = _blocks()
    assert tour[0].startswith(". .venv/bin/activate")
    servers = [c for c in tour if c.startswith("coco-csi node")]
    assert servers == [tour[-1]], "the tour's one long-running command is its last"
    (tmp_path / ".venv").symlink_to(_venv())
    try:
        _run_steps(tour[:-1], tmp_path)
        _run_node(tour[-1], tmp_path)
    finally:
        plain = tmp_path / "plain"
        if plain.is_dir() and os.path.ismount(plain):
            subprocess.run(["fusermount3", "-u", "-z", str(plain)], check=False)
