"""Interop with a real Go ttrpc server: Debian's containerd, run in a scratch directory.

containerd serves ttrpc on ``<grpc address>.ttrpc`` (and grpc-go on the gRPC address). It has
no AA/CDH services, which is the point for status decoding: an unknown service must come
back as the typed error the gRPC path would give (Go: 12 UNIMPLEMENTED "service foo.Bar").
Its events service (``Forward``) answers success the Go way, with the status omitted.
``./run test`` installs containerd; without it these tests skip with the reason.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from sealed_secrets import ttrpc
from sealed_secrets.cdh_client import CdhClient
from sealed_secrets.errors import AttestationError, KbsError, TransportMismatch
from sealed_secrets.evidence import AaEvidenceProvider
from sealed_secrets.ttrpc import TtrpcClient, TtrpcError, sniff_transport
from tests.peers.harness import short_tmpdir

EVENTS = "containerd.services.events.ttrpc.v1.Events"
CONFIG = """version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{d}/c.sock"
[ttrpc]
  address = "{d}/c.sock.ttrpc"
"""


@dataclass
class Containerd:
    proc: subprocess.Popen[bytes]
    ttrpc: str
    grpc: str


@pytest.fixture(scope="module")
def containerd() -> Iterator[Containerd]:
    binary = shutil.which("containerd")
    if binary is None:
        pytest.skip("containerd is not installed (./run test installs Debian's containerd)")
    with short_tmpdir("ctd") as d:
        with open(f"{d}/config.toml", "w") as f:
            f.write(CONFIG.format(d=d))
        log = open(f"{d}/log", "wb")  # noqa: SIM115 - closed below, after the process
        proc = subprocess.Popen(
            [binary, "--config", f"{d}/config.toml"], stdout=log, stderr=subprocess.STDOUT
        )
        sock = f"{d}/c.sock.ttrpc"
        deadline = time.monotonic() + 15
        while not (os.path.exists(sock) and os.path.exists(f"{d}/c.sock")):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                log.close()
                tail = pathlib.Path(f"{d}/log").read_bytes()[-400:].decode(errors="replace")
                pytest.skip(f"containerd did not start: {tail}")
            time.sleep(0.05)
        try:
            yield Containerd(proc, sock, f"{d}/c.sock")
        finally:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


def _ld(field: int, data: bytes) -> bytes:
    """A length-delimited protobuf field (lengths here stay below 128)."""
    assert len(data) < 128
    return bytes([field << 3 | 2, len(data)]) + data


# events.v1 ForwardRequest{Envelope{timestamp{seconds: 1}, namespace, topic, event: Any}}
FORWARD = _ld(
    1,
    _ld(1, b"\x08\x01")
    + _ld(2, b"default")
    + _ld(3, b"/coco-csi/probe")
    + _ld(4, _ld(1, b"types.coco-csi.test/Probe")),
)


def test_unknown_service_is_unimplemented(containerd: Containerd) -> None:
    client = TtrpcClient(containerd.ttrpc)
    with pytest.raises(TtrpcError) as info:
        client.call("foo.Bar", "Baz", b"", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert info.value.details() == "service foo.Bar"
    with pytest.raises(TtrpcError) as info:
        client.call(EVENTS, "Nope", b"", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert info.value.details() == "method Nope"
    client.close()


def test_product_clients_map_go_status_to_typed_errors(containerd: Containerd) -> None:
    aa = AaEvidenceProvider(f"unix://{containerd.ttrpc}", timeout=5)
    with pytest.raises(AttestationError, match="GetTeeType failed: code=UNIMPLEMENTED"):
        aa.tee_type()
    assert aa.additional_evidence(b"r") == ""  # UNIMPLEMENTED = an AA without the RPC
    cdh = CdhClient(f"ttrpc+unix://{containerd.ttrpc}", timeout=5)
    with pytest.raises(KbsError, match="code=UNIMPLEMENTED") as info:
        cdh.get_resource("kbs:///default/key/1")
    assert "api.GetResourceService" in str(info.value)


def test_go_success_without_status_and_stream_ids(containerd: Containerd) -> None:
    client = TtrpcClient(containerd.ttrpc)
    assert client.call(EVENTS, "Forward", FORWARD, timeout=5) == b""  # Go omits status
    with pytest.raises(TtrpcError):
        client.call("foo.Bar", "Baz", b"", timeout=5)
    assert client.call(EVENTS, "Forward", FORWARD, timeout=5, metadata=[("k", "v")]) == b""
    conn = client._conn
    assert conn is not None and conn.next_id == 7  # 1, 3, 5 on one connection
    client.close()


def test_frame_bytes_match_the_reference_encoding(containerd: Containerd) -> None:
    """Hand-built frames (reference/ttrpc.md 4) get the same answers as the client's."""
    body = b"\x0a\x07foo.Bar\x12\x03Baz"
    assert ttrpc.encode_request("foo.Bar", "Baz", b"") == body
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(containerd.ttrpc)
        s.settimeout(5)
        s.sendall(struct.pack(">IIBB", len(body), 1, 1, 0) + body)
        s.sendall(struct.pack(">IIBB", len(body), 2, 1, 0) + body)  # even: refused
        replies = {}
        for _ in range(2):
            length, sid, mtype, flags = struct.unpack(">IIBB", s.recv(10, socket.MSG_WAITALL))
            replies[sid] = (mtype, s.recv(length, socket.MSG_WAITALL) if length else b"")
    with pytest.raises(TtrpcError) as info:
        ttrpc.decode_response(replies[1][1])
    assert replies[1][0] == ttrpc.TYPE_RESPONSE and info.value.code().name == "UNIMPLEMENTED"
    with pytest.raises(TtrpcError) as info:
        ttrpc.decode_response(replies[2][1])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_oversized_frame_is_resource_exhausted(containerd: Containerd) -> None:
    big = b"\0" * (ttrpc.MAX_MESSAGE + 1)
    client = TtrpcClient(containerd.ttrpc)
    with pytest.raises(TtrpcError) as info:  # refused by our client, never sent
        client.call(EVENTS, "Forward", big, timeout=5)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with socket.socket(socket.AF_UNIX) as s:  # what Go answers to one that is sent
        s.connect(containerd.ttrpc)
        s.settimeout(10)
        s.sendall(struct.pack(">IIBB", len(big), 1, 1, 0) + big)
        length, sid, _, _ = struct.unpack(">IIBB", s.recv(10, socket.MSG_WAITALL))
        reply = s.recv(length, socket.MSG_WAITALL)
    with pytest.raises(TtrpcError) as info:
        ttrpc.decode_response(reply)
    assert sid == 1 and info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.call(EVENTS, "Forward", FORWARD, timeout=5) == b""


def test_deadline_when_the_server_stalls(containerd: Containerd) -> None:
    client = TtrpcClient(containerd.ttrpc)
    assert client.call(EVENTS, "Forward", FORWARD, timeout=5) == b""
    containerd.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(0.2)
        started = time.monotonic()
        with pytest.raises(TtrpcError) as info:
            client.call(EVENTS, "Forward", FORWARD, timeout=0.4)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert 0.35 < time.monotonic() - started < 1.5
    finally:
        containerd.proc.send_signal(signal.SIGCONT)
    # the late reply to the timed-out stream is dropped; the connection stays usable
    with pytest.raises(TtrpcError) as info:
        client.call("foo.Bar", "Baz", b"", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_transport_mismatch_against_real_go_servers(containerd: Containerd) -> None:
    assert sniff_transport(containerd.ttrpc) == "ttrpc"
    assert sniff_transport(containerd.grpc) == "grpc"
    with pytest.raises(TransportMismatch, match="speaks gRPC \\(HTTP/2\\), not ttrpc"):
        CdhClient(f"unix://{containerd.grpc}", timeout=5).get_resource("kbs:///a/b/c")
    with pytest.raises(TransportMismatch, match="speaks ttrpc, not gRPC"):
        AaEvidenceProvider(f"grpc+unix://{containerd.ttrpc}", timeout=5).tee_type()
