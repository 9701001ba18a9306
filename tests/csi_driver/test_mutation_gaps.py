"""Node-plugin behaviours a mutation run showed untested (issue 9): each test here failed on a
planted bug while the rest of the suite stayed green.

* a volume id is a path component on the node (ephemeral and backend-root volumes): ``..``,
  ``a/b`` and friends are INVALID_ARGUMENT before anything is created or deleted;
* a plaintext passphrase is refused from ``volume_context`` as well as from ``secrets``;
* a sealed-passphrase volume keeps its data across unpublish/republish (it is initialised
  once, never wiped).
"""

from __future__ import annotations

import os

import grpc
import pytest

from coco_proto import csi_pb2

from .conftest import SIGNING_KID, Env
from .helpers import create_volume, expect_code, publish_request

BAD_IDS = ["..", ".", "a/b", "../victim", "a/../../victim", "/abs", "x\0y", "-dash", "a" * 129]
DATA = b"written before the republish\n" * 100


class _AllowTestKid:
    """The node core's resolver, with the test signing kid on the unseal allow-list.

    main's node plugin passes no ``allowed_kids`` yet (the flag is part of issue 7's node
    hardening), so every KBS-signed sealed passphrase is refused; this stands in for the
    measured ``--allowed-kid`` configuration until it lands.
    """

    def __init__(self, inner: object) -> None:
        self.inner = inner

    def get_resource(self, uri: str) -> bytes:
        return self.inner.get_resource(uri)  # type: ignore[attr-defined]

    def unseal(self, sealed: str, *, allowed_kids: tuple[str, ...] = ()) -> bytes:
        kids = [*allowed_kids, SIGNING_KID]
        return self.inner.unseal(sealed, allowed_kids=kids)  # type: ignore[attr-defined]


def _unpublish(env: Env, volume_id: str, target: str) -> None:
    env.node.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target)
    )


@pytest.mark.parametrize("bad", BAD_IDS)
def test_volume_id_that_is_not_one_safe_path_component_is_refused(env: Env, bad: str) -> None:
    """An ephemeral volume's id becomes ``<state>/ephemeral/<id>``, created on publish and
    deleted on failure or unpublish: a hostile id must not reach the filesystem at all."""
    victim = env.tmp / "node-state" / "victim"
    victim.mkdir(parents=True, exist_ok=True)
    (victim / "keep").write_bytes(b"must survive")
    os.makedirs(env.core.ephemeral_root, exist_ok=True)
    before = sorted(os.listdir(env.core.ephemeral_root))
    req = publish_request(
        None,
        env.target(),
        volume_id=bad,
        context={"csi.storage.k8s.io/ephemeral": "true", "csi.storage.k8s.io/pod.name": "p"},
    )
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, env.node.node.NodePublishVolume, req)
    assert (victim / "keep").read_bytes() == b"must survive"
    assert sorted(os.listdir(env.core.ephemeral_root)) == before
    assert not os.path.exists(env.target())
    assert env.core.publications() == []


def test_a_good_volume_id_still_publishes(env: Env) -> None:
    """The check above must not refuse ids kubelet really sends (it would be vacuous)."""
    target = env.target()
    req = publish_request(
        None,
        target,
        volume_id="csi-0123abcd.v1_x-y",
        context={"csi.storage.k8s.io/ephemeral": "true", "csi.storage.k8s.io/pod.name": "p"},
    )
    env.node.node.NodePublishVolume(req)
    _unpublish(env, "csi-0123abcd.v1_x-y", target)


def test_plaintext_passphrase_in_volume_context_is_refused_and_not_echoed(env: Env) -> None:
    """volume_context comes from the PV (control plane): a clear passphrase there has passed
    through the host and etcd, exactly like one in ``secrets``."""
    vol = create_volume(env)
    for plain in ("hunter2-plain", "correct horse battery staple"):
        req = publish_request(vol, env.target(), context={"passphrase": plain})
        err = expect_code(grpc.StatusCode.INVALID_ARGUMENT, env.node.node.NodePublishVolume, req)
        assert plain not in (err.details() or "")
    assert env.core.publications() == []
    assert not os.path.exists(env.target())


@pytest.mark.parametrize("where", ["secrets", "volume_context"])
def test_sealed_passphrase_volume_keeps_its_data_across_republish(env: Env, where: str) -> None:
    """Silent data loss would look like success: write, unpublish, republish with the same
    sealed passphrase (a fresh string: sealing is randomised) and read the data back."""
    env.core.resolver = _AllowTestKid(env.core.resolver)
    vol = create_volume(env)
    target = env.target()

    def publish() -> None:
        sealed = env.keys.seal_passphrase()
        kw = {"secrets": {"passphrase": sealed}} if where == "secrets" else {}
        req = publish_request(vol, target, context={"passphrase": sealed}, **kw)
        if where == "secrets":
            del req.volume_context["passphrase"]
        del req.volume_context["keyResource"]
        env.node.node.NodePublishVolume(req)

    publish()
    os.makedirs(os.path.join(target, "dir"))
    with open(os.path.join(target, "dir", "kept.bin"), "wb") as f:
        f.write(DATA)
    conf = os.path.join(vol.volume_context["cipherDir"], "gocryptfs.conf")
    with open(conf, "rb") as f:
        conf_before = f.read()
    _unpublish(env, vol.volume_id, target)
    assert not os.path.exists(target)

    publish()
    with open(os.path.join(target, "dir", "kept.bin"), "rb") as f:
        assert f.read() == DATA
    with open(conf, "rb") as f:
        assert f.read() == conf_before, "the volume was re-initialised"
    _unpublish(env, vol.volume_id, target)
