"""The node and controller cores are protocol-free: plain dataclasses in, typed errors out."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

from coco_proto import csi_pb2
from csi_driver import convert, errors
from csi_driver.core import volcap
from csi_driver.core.volcap import AccessMode, AccessType, Capability

CORE = pathlib.Path(__file__).resolve().parents[2] / "csi_driver" / "core"
PROTOCOL = ("grpc", "google", "coco_proto")


def _imports(path: pathlib.Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_core_modules_import_no_protocol(path: pathlib.Path) -> None:
    bad = sorted(m for m in _imports(path) if m.split(".")[0] in PROTOCOL)
    assert bad == [], f"{path.name} imports {bad}"


def test_importing_the_cores_loads_no_protocol_module_at_all() -> None:
    """Not even indirectly (errors.py used to import grpc for its status codes)."""
    code = (
        "import sys\n"
        "import csi_driver.core.node, csi_driver.core.controller, csi_driver.core.store\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {PROTOCOL!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_error_code_is_a_grpc_status() -> None:
    import grpc

    for code in errors.Code:
        assert grpc.StatusCode[code.name].value[0] == code.value


def _cap(**kw: object) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(**kw)  # type: ignore[arg-type]


Mode = csi_pb2.VolumeCapability.AccessMode.Mode


@pytest.mark.parametrize(
    "pb,missing",
    [
        (_cap(access_mode=csi_pb2.VolumeCapability.AccessMode(mode=1)), True),
        (_cap(mount=csi_pb2.VolumeCapability.MountVolume()), True),
        (
            _cap(
                block=csi_pb2.VolumeCapability.BlockVolume(),
                access_mode=csi_pb2.VolumeCapability.AccessMode(mode=1),
            ),
            False,
        ),
        (
            _cap(
                mount=csi_pb2.VolumeCapability.MountVolume(),
                access_mode=csi_pb2.VolumeCapability.AccessMode(mode=Mode.MULTI_NODE_MULTI_WRITER),
            ),
            False,
        ),
        (
            _cap(
                mount=csi_pb2.VolumeCapability.MountVolume(),
                access_mode=csi_pb2.VolumeCapability.AccessMode(mode=99),
            ),
            False,
        ),
    ],
)
def test_capability_checks_return_typed_reasons(
    pb: csi_pb2.VolumeCapability, missing: bool
) -> None:
    problem = volcap.unsupported(convert.capability(pb))
    assert problem is not None and problem.missing is missing


def test_conversion_keeps_what_the_core_needs() -> None:
    pb = _cap(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4", mount_flags=["ro", "noatime"]),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=Mode.MULTI_NODE_READER_ONLY),
    )
    cap = convert.capability(pb)
    assert cap == Capability(
        AccessType.MOUNT, AccessMode.MULTI_NODE_READER_ONLY, "ext4", ("ro", "noatime")
    )
    assert cap.readonly_mode and volcap.unsupported(cap) is None
    # The enum numbers are CSI's.
    for mode in AccessMode:
        assert Mode.Value(mode.name) == mode.value
