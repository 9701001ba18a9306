"""Controller plugin: CreateVolume/DeleteVolume/ValidateVolumeCapabilities over a real socket."""

from __future__ import annotations

import os

import grpc

from coco_proto import csi_pb2
from csi_driver.core.controller import DEFAULT_CAPACITY, LocalBackend

from .conftest import KEY_RESOURCE, Env
from .helpers import Mode, expect_code, mount_capability, plain_capability


def _req(name: str = "pvc", **kw) -> csi_pb2.CreateVolumeRequest:
    params = kw.pop("parameters", {"keyResource": KEY_RESOURCE})
    return csi_pb2.CreateVolumeRequest(
        name=name,
        volume_capabilities=kw.pop("caps", [mount_capability()]),
        parameters=params,
        **kw,
    )


def test_create_allocates_directory_and_context(env: Env) -> None:
    vol = env.ctrl.controller.CreateVolume(
        _req(capacity_range=csi_pb2.CapacityRange(required_bytes=5 << 20))
    ).volume
    assert vol.volume_id.startswith("coco-")
    assert vol.capacity_bytes == 5 << 20
    assert vol.volume_context["keyResource"] == KEY_RESOURCE
    path = vol.volume_context["cipherDir"]
    assert path == os.path.join(env.backend.root, vol.volume_id) and os.path.isdir(path)
    assert os.listdir(path) == []  # initialised by the node, inside the guest


def test_create_is_idempotent_by_name(env: Env) -> None:
    a = env.ctrl.controller.CreateVolume(_req()).volume
    b = env.ctrl.controller.CreateVolume(_req()).volume
    assert a.volume_id == b.volume_id and a.capacity_bytes == DEFAULT_CAPACITY
    c = env.ctrl.controller.CreateVolume(_req("other")).volume
    assert c.volume_id != a.volume_id
    # Same name, larger requirement or other key → ALREADY_EXISTS; nothing new allocated.
    expect_code(
        grpc.StatusCode.ALREADY_EXISTS,
        env.ctrl.controller.CreateVolume,
        _req(capacity_range=csi_pb2.CapacityRange(required_bytes=2 * DEFAULT_CAPACITY)),
    )
    expect_code(
        grpc.StatusCode.ALREADY_EXISTS,
        env.ctrl.controller.CreateVolume,
        _req(parameters={"keyResource": "kbs:///other/key/res"}),
    )
    entries = [n for n in os.listdir(env.backend.root) if not n.startswith(".")]
    assert sorted(entries) == sorted([a.volume_id, c.volume_id])


def test_create_survives_controller_restart(env: Env) -> None:
    a = env.ctrl.controller.CreateVolume(_req()).volume
    again = LocalBackend(env.backend.root)
    rec, _ctx = again.create("pvc", [plain_capability()], {"keyResource": KEY_RESOURCE})
    assert rec.volume_id == a.volume_id


def test_create_argument_errors(env: Env) -> None:
    call = env.ctrl.controller.CreateVolume
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, call, _req(""))
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, call, _req(caps=[]))
    block = csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=Mode.SINGLE_NODE_WRITER),
    )
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, call, _req(caps=[block]))
    expect_code(
        grpc.StatusCode.INVALID_ARGUMENT,
        call,
        _req(caps=[mount_capability(Mode.MULTI_NODE_MULTI_WRITER)]),
    )
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, call, _req(parameters={}))
    expect_code(
        grpc.StatusCode.INVALID_ARGUMENT, call, _req(parameters={"keyResource": "https://x/y"})
    )
    expect_code(
        grpc.StatusCode.INVALID_ARGUMENT,
        call,
        _req(parameters={"keyResource": KEY_RESOURCE, "bogus": "1"}),
    )
    expect_code(
        grpc.StatusCode.INVALID_ARGUMENT,
        call,
        _req(capacity_range=csi_pb2.CapacityRange(required_bytes=10, limit_bytes=5)),
    )
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, call, _req("bad\x01name"))
    src = _req()
    src.volume_content_source.volume.volume_id = "x"
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, call, src)
    expect_code(
        grpc.StatusCode.OUT_OF_RANGE,
        call,
        _req(capacity_range=csi_pb2.CapacityRange(required_bytes=1 << 62)),
    )
    assert [n for n in os.listdir(env.backend.root) if not n.startswith(".")] == []


def test_reserved_parameters_are_ignored_and_default_key_applies(tmp_path) -> None:
    backend = LocalBackend(str(tmp_path / "b"), default_key_resource="kbs:///d/k/root")
    rec, ctx = backend.create(
        "pvc",
        [plain_capability()],
        {"csi.storage.k8s.io/pvc/name": "claim", "csi.storage.k8s.io/pvc/namespace": "ns"},
    )
    assert ctx["keyResource"] == "kbs:///d/k/root"
    assert rec.parameters == {"keyResource": "kbs:///d/k/root"}


def test_limit_caps_default_capacity(env: Env) -> None:
    vol = env.ctrl.controller.CreateVolume(
        _req(capacity_range=csi_pb2.CapacityRange(limit_bytes=1 << 20))
    ).volume
    assert vol.capacity_bytes == 1 << 20


def test_delete_is_idempotent_and_releases_directory(env: Env) -> None:
    vol = env.ctrl.controller.CreateVolume(_req()).volume
    path = vol.volume_context["cipherDir"]
    with open(os.path.join(path, "ciphertext"), "wb") as f:
        f.write(b"x")
    env.ctrl.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert not os.path.exists(path)
    env.ctrl.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    expect_code(
        grpc.StatusCode.INVALID_ARGUMENT,
        env.ctrl.controller.DeleteVolume,
        csi_pb2.DeleteVolumeRequest(),
    )
    # The name is free again.
    again = env.ctrl.controller.CreateVolume(_req()).volume
    assert again.volume_id != vol.volume_id


def test_validate_volume_capabilities(env: Env) -> None:
    vol = env.ctrl.controller.CreateVolume(_req()).volume
    call = env.ctrl.controller.ValidateVolumeCapabilities
    ok = call(
        csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=vol.volume_id,
            volume_capabilities=[mount_capability(Mode.MULTI_NODE_READER_ONLY)],
        )
    )
    assert ok.HasField("confirmed")
    assert list(ok.confirmed.volume_capabilities) == [mount_capability(Mode.MULTI_NODE_READER_ONLY)]
    no = call(
        csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=vol.volume_id,
            volume_capabilities=[mount_capability(Mode.MULTI_NODE_MULTI_WRITER)],
        )
    )
    assert not no.HasField("confirmed") and "MULTI_NODE_MULTI_WRITER" in no.message
    expect_code(
        grpc.StatusCode.NOT_FOUND,
        call,
        csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id="coco-missing", volume_capabilities=[mount_capability()]
        ),
    )


def test_unimplemented_rpcs(env: Env) -> None:
    expect_code(
        grpc.StatusCode.UNIMPLEMENTED, env.ctrl.controller.ListVolumes, csi_pb2.ListVolumesRequest()
    )
    expect_code(
        grpc.StatusCode.UNIMPLEMENTED,
        env.ctrl.controller.CreateSnapshot,
        csi_pb2.CreateSnapshotRequest(),
    )
    # NodeStageVolume is served since block volumes (STAGE_UNSTAGE_VOLUME): an empty request
    # is refused as the spec says, not left unimplemented.
    expect_code(
        grpc.StatusCode.INVALID_ARGUMENT,
        env.node.node.NodeStageVolume,
        csi_pb2.NodeStageVolumeRequest(),
    )


def test_node_with_controller_serves_both_roles_on_one_socket(tmp_path, sockdir: str) -> None:
    """`coco-csi node --with-controller`: Identity advertises CONTROLLER_SERVICE, both services
    answer on the one socket, and Probe is ready only when the node is (here: no resolver)."""
    from csi_driver.client import CsiClient
    from csi_driver.core.node import NodeCore
    from csi_driver.server import start_node_with_controller

    core = NodeCore("n", str(tmp_path / "s"), None, mounter="gocryptfs")
    plugin = start_node_with_controller(
        f"unix://{sockdir}/all.sock", core, LocalBackend(str(tmp_path / "b"))
    )
    try:
        with CsiClient(f"unix://{sockdir}/all.sock") as c:
            caps = c.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
            services = [x.service.type for x in caps.capabilities]
            assert services == [csi_pb2.PluginCapability.Service.CONTROLLER_SERVICE]
            assert c.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest()).node_id == "n"
            vol = c.controller.CreateVolume(_req()).volume
            assert os.path.isdir(tmp_path / "b" / vol.volume_id)
            assert c.identity.Probe(csi_pb2.ProbeRequest()).ready.value is False
    finally:
        plugin.stop()


def test_volume_context_carries_the_granted_capacity(tmp_path) -> None:
    backend = LocalBackend(str(tmp_path / "b"))
    rec, ctx = backend.create(
        "pvc", [plain_capability()], {"keyResource": KEY_RESOURCE}, required_bytes=64 << 20
    )
    assert ctx["capacityBytes"] == str(64 << 20) == str(rec.capacity_bytes)


def _block_cap(mode: int = Mode.SINGLE_NODE_WRITER) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode),  # type: ignore[arg-type]
    )


def _fs_cap(fs_type: str, mode: int = Mode.SINGLE_NODE_WRITER) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode),  # type: ignore[arg-type]
    )


STATIC_BLOCK = {
    "devicePath": "/dev/disk/by-id/virtio-data1",
    "sourceType": "encrypted",
    "keyResource": KEY_RESOURCE,
}


def test_validate_static_block_volumes(env: Env) -> None:
    """A block PV is static (the controller never made it): it is known by the volume
    context the node stages it with. Block and mount access are confirmed when that context
    and each capability pass the node's device-free stage checks; what does not fit is
    refused with a message; a directory volume of the index still refuses block access."""
    call = env.ctrl.controller.ValidateVolumeCapabilities

    def check(ctx: dict[str, str], *caps: csi_pb2.VolumeCapability) -> str | None:
        res = call(
            csi_pb2.ValidateVolumeCapabilitiesRequest(
                volume_id="pv-disk-1", volume_capabilities=list(caps), volume_context=ctx
            )
        )
        if res.HasField("confirmed"):
            assert list(res.confirmed.volume_capabilities) == list(caps)
            assert dict(res.confirmed.volume_context) == ctx
            return None
        assert res.message
        return str(res.message)

    ok_sets = [
        (STATIC_BLOCK, [_block_cap()]),
        (STATIC_BLOCK, [_block_cap(Mode.SINGLE_NODE_READER_ONLY), _fs_cap("xfs")]),
        (STATIC_BLOCK, [mount_capability(Mode.MULTI_NODE_READER_ONLY)]),
        ({**STATIC_BLOCK, "devicePath": "", "deviceId": "253:16"}, [_block_cap()]),
        ({**STATIC_BLOCK, "sourceType": "empty", "mkfsOpts": "-m 0"}, [_fs_cap("ext4")]),
        ({**STATIC_BLOCK, "dataIntegrity": "true"}, [_block_cap()]),  # the node decides
    ]
    for ctx, caps in ok_sets:
        assert check(ctx, *caps) is None, (ctx, caps)

    refused = [
        (STATIC_BLOCK, [_block_cap(Mode.MULTI_NODE_MULTI_WRITER)], "MULTI_NODE_MULTI_WRITER"),
        (STATIC_BLOCK, [_block_cap(), _fs_cap("btrfs")], "btrfs"),
        ({**STATIC_BLOCK, "mkfsOpts": "-d /etc"}, [_fs_cap("ext4")], "mkfsOpts"),
        ({**STATIC_BLOCK, "sourceType": "wipe"}, [_block_cap()], "sourceType"),
        ({**STATIC_BLOCK, "devicePath": "dev/vdb"}, [_block_cap()], "devicePath"),
        ({**STATIC_BLOCK, "devicePath": "/dev/../etc/passwd"}, [_block_cap()], "normalised"),
        ({**STATIC_BLOCK, "deviceId": "8:0"}, [_block_cap()], "not both"),
        ({"deviceId": "8-0", "keyResource": KEY_RESOURCE}, [_block_cap()], "MAJ:MIN"),
        (
            {**STATIC_BLOCK, "sourceType": "empty"},
            [_block_cap(Mode.SINGLE_NODE_READER_ONLY)],
            "read-only",
        ),
        ({**STATIC_BLOCK, "dataIntegrity": "yes"}, [_block_cap()], "dataIntegrity"),
        ({**STATIC_BLOCK, "keyResource": "http://kbs/x"}, [_block_cap()], "kbs"),
    ]
    for ctx, caps, why in refused:
        message = check(ctx, *caps)
        assert message is not None and why in message, (ctx, message)

    vol = env.ctrl.controller.CreateVolume(_req()).volume  # a directory volume
    res = call(
        csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=vol.volume_id, volume_capabilities=[_block_cap()], volume_context=STATIC_BLOCK
        )
    )
    assert not res.HasField("confirmed") and "block access is not supported" in res.message
    expect_code(
        grpc.StatusCode.NOT_FOUND,
        call,
        csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id="pv-unknown", volume_capabilities=[_block_cap()], volume_context={"x": "y"}
        ),
    )
