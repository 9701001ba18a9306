"""csi_driver/rpc.py: the one place a CsiError becomes its gRPC status, over real gRPC.

A servicer method decorated with ``csi_rpc`` runs in a real gRPC server on a unix socket;
the client must see exactly the code each error class is bound to, the error's own message,
and for anything unexpected INTERNAL naming only the exception's type. The log line and
the failure counter carry the request's safe identifying fields, never its secrets.
"""

from __future__ import annotations

import logging
import pathlib
import tempfile
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from coco_proto import csi_pb2, csi_pb2_grpc
from csi_driver import errors
from csi_driver.metrics import Metrics
from csi_driver.rpc import csi_rpc

SECRET = "sealed.do-not-log-this-passphrase"


def _all_error_classes() -> list[type[errors.CsiError]]:
    out, todo = [], [errors.CsiError]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return sorted(out, key=lambda c: c.__name__)


class _Node(csi_pb2_grpc.NodeServicer):
    """A Node servicer whose NodePublishVolume raises what the test says."""

    def __init__(self) -> None:
        self.metrics = Metrics()
        self.raise_next: BaseException | None = None

    @csi_rpc("NodePublishVolume")
    def NodePublishVolume(  # noqa: N802 - gRPC's method name
        self, request: csi_pb2.NodePublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodePublishVolumeResponse:
        exc, self.raise_next = self.raise_next, None
        if exc is not None:
            raise exc
        return csi_pb2.NodePublishVolumeResponse()


@pytest.fixture
def node() -> Iterator[tuple[_Node, csi_pb2_grpc.NodeStub]]:
    servicer = _Node()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    csi_pb2_grpc.add_NodeServicer_to_server(servicer, server)
    with tempfile.TemporaryDirectory(prefix="csirpc", dir="/tmp") as d:
        sock = pathlib.Path(d) / "n.sock"
        assert server.add_insecure_port(f"unix://{sock}") != 0
        server.start()
        channel = grpc.insecure_channel(f"unix://{sock}")
        try:
            yield servicer, csi_pb2_grpc.NodeStub(channel)
        finally:
            channel.close()
            server.stop(0).wait()


def _request() -> csi_pb2.NodePublishVolumeRequest:
    return csi_pb2.NodePublishVolumeRequest(
        volume_id="vol-1",
        target_path="/var/lib/kubelet/pods/p/volumes/x/mount",
        secrets={"passphrase": SECRET},
        volume_context={"passphrase": SECRET},
    )


def _failures(servicer: _Node, code: str) -> float:
    value = servicer.metrics.registry.get_sample_value(
        "coco_csi_rpc_failures_total", {"method": "NodePublishVolume", "code": code}
    )
    return value or 0.0


@pytest.mark.parametrize("cls", _all_error_classes(), ids=lambda c: c.__name__)
def test_each_error_class_reaches_the_client_as_its_code(
    node: tuple[_Node, csi_pb2_grpc.NodeStub], cls: type[errors.CsiError]
) -> None:
    servicer, stub = node
    servicer.raise_next = cls(f"{cls.__name__} for vol-1")
    with pytest.raises(grpc.RpcError) as info:
        stub.NodePublishVolume(_request(), timeout=10)
    assert info.value.code() == grpc.StatusCode[cls.code.name]
    assert info.value.code().value[0] == cls.code.value  # the enum's numbers are gRPC's
    assert info.value.details() == f"{cls.__name__} for vol-1"
    assert _failures(servicer, cls.code.name) == 1


def test_success_passes_the_response_through(node: tuple[_Node, csi_pb2_grpc.NodeStub]) -> None:
    servicer, stub = node
    assert stub.NodePublishVolume(_request(), timeout=10) == csi_pb2.NodePublishVolumeResponse()
    assert servicer.metrics.registry.get_sample_value("coco_csi_rpc_failures_total") is None


def test_unexpected_exception_is_internal_and_names_only_its_type(
    node: tuple[_Node, csi_pb2_grpc.NodeStub], caplog: pytest.LogCaptureFixture
) -> None:
    servicer, stub = node
    servicer.raise_next = KeyError(SECRET)
    with (
        caplog.at_level(logging.DEBUG, logger="csi_driver.rpc"),
        pytest.raises(grpc.RpcError) as info,
    ):
        stub.NodePublishVolume(_request(), timeout=10)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert info.value.details() == "NodePublishVolume failed: KeyError"
    assert _failures(servicer, "INTERNAL") == 1
    (record,) = [r for r in caplog.records if r.name == "csi_driver.rpc"]
    assert record.fields["exc"] == "KeyError"  # type: ignore[attr-defined]


def test_log_fields_are_the_safe_ones_only(
    node: tuple[_Node, csi_pb2_grpc.NodeStub], caplog: pytest.LogCaptureFixture
) -> None:
    servicer, stub = node
    servicer.raise_next = errors.NotFound("no such volume vol-1")
    with caplog.at_level(logging.DEBUG, logger="csi_driver.rpc"):
        with pytest.raises(grpc.RpcError):
            stub.NodePublishVolume(_request(), timeout=10)
        stub.NodePublishVolume(_request(), timeout=10)
    records = [r for r in caplog.records if r.name == "csi_driver.rpc"]
    assert [r.fields["code"] for r in records] == ["NOT_FOUND", "OK"]  # type: ignore[attr-defined]
    for r in records:
        fields = r.fields  # type: ignore[attr-defined]
        assert set(fields) <= {"rpc", "volume_id", "target_path", "code", "ms", "exc"}
        assert fields["volume_id"] == "vol-1"
        assert SECRET not in repr(fields) and SECRET not in r.getMessage()
