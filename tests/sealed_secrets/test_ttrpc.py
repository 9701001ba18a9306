"""The ttrpc transport: AA and CDH clients against the ttrpc test peer (real unix sockets).

The peer serves the same AA/CDH servicers as the gRPC peers (tests/peers/ttrpc_server.py),
so every behaviour is checked once per transport; the wire faults here exist only in ttrpc.
"""

from __future__ import annotations

import base64
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from coco_proto import ttrpc_pb2
from sealed_secrets.cdh_client import CdhClient
from sealed_secrets.errors import (
    AttestationError,
    KbsError,
    KbsUnavailable,
    PolicyDenied,
    ProviderError,
    ResolverError,
    TransportMismatch,
    UnsealFailed,
)
from sealed_secrets.evidence import AaEvidenceProvider
from sealed_secrets.guest_rpc import parse_endpoint
from sealed_secrets.resolver import build_resolver
from sealed_secrets.ttrpc import MAX_MESSAGE, TtrpcClient, TtrpcError, sniff_transport
from tests.peers.aa_server import AaServer
from tests.peers.cdh_server import CdhServer
from tests.peers.harness import RESOURCES, kbs_and_aa, kbs_spec, short_tmpdir
from tests.sealed_secrets.vectors_coco import PUBLIC_JWK, SIGNING_KID, VECTOR_A, VECTOR_C

AA_SERVICE = "attestation_agent.AttestationAgentService"
R1 = "kbs:///default/key/1"
KID = SIGNING_KID
PLAIN = b"unsealed_secret"
CDH_RESOURCES = {
    "default/sealed-secret/test": PLAIN,
    "default/signing-key/sealed-secret": PUBLIC_JWK,
    "default/key/1": b"\x00cdh-resource\xff",
}


@pytest.fixture
def ttrpc_aa() -> Iterator[AaServer]:
    with short_tmpdir() as d, AaServer(f"{d}/aa.sock", transport="ttrpc") as server:
        yield server


@pytest.fixture
def ttrpc_cdh() -> Iterator[CdhServer]:
    with short_tmpdir() as d, CdhServer(f"{d}/cdh.sock", CDH_RESOURCES, transport="ttrpc") as s:
        yield s


def ttrpc_log(peer: AaServer | CdhServer) -> list[tuple[int, str, str, int]]:
    return list(peer._server.requests)


# --- Attestation Agent over ttrpc -------------------------------------------------------------


def test_aa_sample_evidence_over_ttrpc(ttrpc_aa: AaServer) -> None:
    assert ttrpc_aa.target.startswith("unix://")  # plain unix:// is ttrpc, CoCo's default
    p = AaEvidenceProvider(ttrpc_aa.target)
    assert p.target == f"ttrpc+unix://{ttrpc_aa.socket_path}"
    assert p.tee_type() == "sample"
    report = bytes(range(48))
    assert json.loads(p.primary_evidence(report)) == {
        "svn": "1",
        "report_data": base64.b64encode(report).decode(),
    }
    extra = json.loads(p.additional_evidence(report))
    assert "sample-device" in extra
    log = ttrpc_log(ttrpc_aa)
    assert [sid for sid, *_ in log] == [1, 3, 5]  # odd, +2 per call on one connection
    assert [m for _, _, m, _ in log] == ["GetTeeType", "GetEvidence", "GetAdditionalEvidence"]
    assert all(s == AA_SERVICE for _, s, _, _ in log)
    assert all(ns == int(30 * 1e9) for *_, ns in log)  # the client's deadline travels
    p.close()


def test_aa_status_codes_map_like_grpc(ttrpc_aa: AaServer) -> None:
    p = AaEvidenceProvider(ttrpc_aa.target)
    ttrpc_aa.inject("GetEvidence", grpc.StatusCode.INTERNAL)
    with pytest.raises(AttestationError, match="GetEvidence failed: code=INTERNAL"):
        p.primary_evidence(b"r")
    for code in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND):
        ttrpc_aa.inject("GetAdditionalEvidence", code)  # older AA / codegen "not supported"
        assert p.additional_evidence(b"r") == ""
    ttrpc_aa.inject("GetAdditionalEvidence", grpc.StatusCode.UNAVAILABLE)
    with pytest.raises(AttestationError, match="UNAVAILABLE"):
        p.additional_evidence(b"r")


@pytest.mark.parametrize("tee", ["", "x" * 33, "td x", "tdx\n", "../tdx"])
def test_aa_unusable_tee_type_is_attestation_error(ttrpc_aa: AaServer, tee: str) -> None:
    ttrpc_aa.tee = tee
    with pytest.raises(AttestationError, match="no usable TEE type"):
        AaEvidenceProvider(ttrpc_aa.target).tee_type()


def test_kbs_flow_through_ttrpc_aa() -> None:
    with kbs_and_aa(aa_transport="ttrpc") as (kbs, aa):
        assert aa.target.startswith("unix://")
        r = build_resolver(kbs_spec(kbs, aa), cache_ttl=0)
        assert r.get_resource(R1) == RESOURCES["default/key/1"]
        assert r.get_resource("kbs:///default/key/2") == RESOURCES["default/key/2"]
        assert kbs.calls["attest_ok"] == 1
        assert aa.calls["GetTeeType"] == 1 and aa.calls["GetEvidence"] == 1
        with pytest.raises(PolicyDenied):
            r.get_resource("kbs:///denied/key/1")


def test_kbs_token_mode_through_ttrpc_aa() -> None:
    with kbs_and_aa(aa_transport="ttrpc") as (kbs, aa):
        aa.kbs_url = kbs.url
        r = build_resolver(kbs_spec(kbs, aa, "&attest=token"), cache_ttl=0)
        assert r.get_resource(R1) == RESOURCES["default/key/1"]
        assert aa.calls["GetToken"] == 1 and aa.calls["GetEvidence"] == 0


def test_tee_type_in_kbs_auth_comes_from_the_aa() -> None:
    """The /auth ``tee`` is what GetTeeType says, not an assumption (here: tdx)."""
    with kbs_and_aa(aa_transport="ttrpc", aa_tee="tdx") as (kbs, aa):
        r = build_resolver(kbs_spec(kbs, aa, "&retries=0"), cache_ttl=0)
        with pytest.raises(AttestationError, match="unsupported tee 'tdx'"):
            r.get_resource(R1)
        kbs.state.tees = ("tdx",)  # a KBS that accepts tdx (its verifier is the sample one)
        assert r.get_resource(R1) == RESOURCES["default/key/1"]
        assert aa.calls["GetTeeType"] == 2


def test_spec_spells_transport_explicitly() -> None:
    with kbs_and_aa(aa_transport="ttrpc") as (kbs, aa):
        spec = kbs_spec(kbs, aa).replace("aa=unix://", "aa=ttrpc+unix://")
        assert "aa=ttrpc+unix://" in spec  # '+' must survive the query decoding
        assert build_resolver(spec, cache_ttl=0).get_resource(R1) == RESOURCES["default/key/1"]


# --- Confidential Data Hub over ttrpc ---------------------------------------------------------


def test_cdh_resources_and_unsealing_over_ttrpc(ttrpc_cdh: CdhServer) -> None:
    r = build_resolver(f"cdh:{ttrpc_cdh.target}", cache_ttl=30)
    assert r.get_resource(R1) == CDH_RESOURCES["default/key/1"]
    assert r.get_resource(R1) == CDH_RESOURCES["default/key/1"]
    assert ttrpc_cdh.calls["GetResource"] == 1
    with pytest.raises(UnsealFailed):  # the kid gate still applies before CDH
        r.unseal(VECTOR_A)
    assert r.unseal(VECTOR_A, allowed_kids=[KID]) == PLAIN
    c = CdhClient(f"ttrpc+unix://{ttrpc_cdh.socket_path}")
    with pytest.raises(ProviderError, match="code=INTERNAL"):
        c.unseal(VECTOR_C)  # unsigned: CDH refuses, INTERNAL as upstream
    with pytest.raises(KbsError, match="not found"):
        c.get_resource("kbs:///default/key/404")
    services = {s for _, s, _, _ in ttrpc_log(ttrpc_cdh)}
    assert services == {"api.GetResourceService", "api.SealedSecretService"}


def test_cdh_unavailable_and_deadlines(ttrpc_cdh: CdhServer) -> None:
    ttrpc_cdh.inject("GetResource", grpc.StatusCode.UNAVAILABLE)
    with pytest.raises(KbsUnavailable, match="UNAVAILABLE"):
        CdhClient(ttrpc_cdh.target).get_resource(R1)
    ttrpc_cdh.inject("GetResource", 3.0)
    started = time.monotonic()
    with pytest.raises(KbsUnavailable, match="DEADLINE_EXCEEDED"):
        CdhClient(ttrpc_cdh.target, timeout=0.3).get_resource(R1)
    assert time.monotonic() - started < 2.0  # the client's deadline, not the server's delay


def test_server_side_timeout_nano_is_deadline_exceeded(ttrpc_cdh: CdhServer) -> None:
    """The server applies timeout_nano (ttrpc-rust answers 4 "timeout")."""
    ttrpc_cdh.inject("GetResource", 0.6)
    client = TtrpcClient(ttrpc_cdh.socket_path)
    from coco_proto import confidential_data_hub_pb2 as pb

    payload = pb.GetResourceRequest(ResourcePath=R1).SerializeToString()
    # timeout_nano of 0.2 s on the wire; the client itself would wait up to 5 s
    from sealed_secrets import ttrpc as t

    request = t.encode_request("api.GetResourceService", "GetResource", payload, 0.2)
    conn = client._connection(None)
    with pytest.raises(TtrpcError) as info:
        conn.call(request, time.monotonic() + 5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert info.value.details() == "timeout"
    client.close()


def test_socket_absent_is_unavailable() -> None:
    with pytest.raises(KbsUnavailable, match="UNAVAILABLE"):
        CdhClient("unix:///nonexistent/cdh.sock", timeout=2).get_resource(R1)
    with pytest.raises(AttestationError, match="UNAVAILABLE"):
        AaEvidenceProvider("unix:///nonexistent/aa.sock", timeout=2).tee_type()


@pytest.mark.parametrize(
    ("fault", "cls", "code"),
    [
        ("oversized", KbsError, "RESOURCE_EXHAUSTED"),
        ("close-mid-reply", KbsUnavailable, "UNAVAILABLE"),
        ("garbage", KbsError, "INTERNAL"),
        ("data-frame", KbsError, "INTERNAL"),
        ("no-reply", KbsUnavailable, "DEADLINE_EXCEEDED"),
    ],
)
def test_wire_faults_are_typed_errors(
    ttrpc_cdh: CdhServer, fault: str, cls: type[Exception], code: str
) -> None:
    client = CdhClient(ttrpc_cdh.target, timeout=1.0)
    ttrpc_cdh.inject("GetResource", fault)
    with pytest.raises(cls, match=f"code={code}"):
        client.get_resource(R1)
    # the client recovers: a fresh connection (or the same one) serves the next call
    assert client.get_resource(R1) == CDH_RESOURCES["default/key/1"]


def test_reply_on_foreign_stream_is_ignored(ttrpc_cdh: CdhServer) -> None:
    ttrpc_cdh.inject("GetResource", "wrong-stream")
    client = CdhClient(ttrpc_cdh.target, timeout=2)
    assert client.get_resource(R1) == b""  # the real (empty) reply on our stream wins


def test_oversized_request_is_refused_before_sending(ttrpc_cdh: CdhServer) -> None:
    client = CdhClient(ttrpc_cdh.target)
    with pytest.raises(ProviderError, match="RESOURCE_EXHAUSTED"):
        client.unseal("sealed." + "a" * MAX_MESSAGE)
    assert ttrpc_cdh.calls["UnsealSecret"] == 0 and ttrpc_log(ttrpc_cdh) == []
    assert client.get_resource(R1) == CDH_RESOURCES["default/key/1"]
    assert ttrpc_log(ttrpc_cdh)[0][0] == 1  # no stream id was spent on the refused call


def test_peer_answers_oversized_request_frame(ttrpc_cdh: CdhServer) -> None:
    """A request frame over 4 MiB is discarded by the server and answered on its stream."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(ttrpc_cdh.socket_path)
        s.settimeout(5)
        s.sendall(struct.pack(">IIBB", MAX_MESSAGE + 1, 1, 1, 0) + b"\0" * (MAX_MESSAGE + 1))
        header = s.recv(10, socket.MSG_WAITALL)
        length, sid, mtype, _ = struct.unpack(">IIBB", header)
        body = s.recv(length, socket.MSG_WAITALL)
    assert (sid, mtype) == (1, 2)
    assert ttrpc_pb2.Response.FromString(body).status.code == 3


def test_concurrent_calls_multiplex_and_overtake(ttrpc_cdh: CdhServer) -> None:
    client = CdhClient(ttrpc_cdh.target, timeout=5)
    ttrpc_cdh.inject("GetResource", 2.0)  # the first call is slow
    results: dict[str, bytes] = {}

    def slow() -> None:
        results["slow"] = client.get_resource(R1)

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.1)
    started = time.monotonic()
    assert client.get_resource("kbs:///default/sealed-secret/test") == PLAIN
    assert time.monotonic() - started < 1.5  # answered while the slow call was pending
    t.join(5)
    assert results["slow"] == CDH_RESOURCES["default/key/1"]
    assert sorted(sid for sid, *_ in ttrpc_log(ttrpc_cdh)) == [1, 3]


def test_many_threads_one_client(ttrpc_cdh: CdhServer) -> None:
    import concurrent.futures

    client = CdhClient(ttrpc_cdh.target, timeout=5)
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda _: client.get_resource(R1), range(40)))
    assert got == [CDH_RESOURCES["default/key/1"]] * 40
    sids = sorted(sid for sid, *_ in ttrpc_log(ttrpc_cdh))
    assert sids == list(range(1, 81, 2))


def test_reconnects_after_peer_restart() -> None:
    with short_tmpdir() as d:
        path = f"{d}/cdh.sock"
        client = CdhClient(f"unix://{path}", timeout=2)
        with CdhServer(path, CDH_RESOURCES, transport="ttrpc"):
            assert client.get_resource(R1) == CDH_RESOURCES["default/key/1"]
        with pytest.raises(KbsUnavailable):
            client.get_resource(R1)
        with CdhServer(path, CDH_RESOURCES, transport="ttrpc") as again:
            assert client.get_resource(R1) == CDH_RESOURCES["default/key/1"]
            assert ttrpc_log(again)[0][0] == 1  # a new connection starts again at 1


# --- transport mismatch: one clear line -------------------------------------------------------


def test_ttrpc_spec_on_a_grpc_socket_says_grpc() -> None:
    with short_tmpdir() as d, CdhServer(f"{d}/c.sock", CDH_RESOURCES) as grpc_cdh:
        assert sniff_transport(grpc_cdh.socket_path) == "grpc"
        with pytest.raises(TransportMismatch) as info:
            CdhClient(f"unix://{grpc_cdh.socket_path}", timeout=3).get_resource(R1)
        msg = str(info.value)
        assert "\n" not in msg
        assert "speaks gRPC (HTTP/2), not ttrpc" in msg
        assert f"grpc+unix://{grpc_cdh.socket_path}" in msg


def test_kbs_resolver_surfaces_the_mismatch() -> None:
    """Through the KBS client the mismatch stays one typed line (not an attestation retry)."""
    with kbs_and_aa() as (kbs, aa):  # a gRPC AA, addressed as plain unix:// (= ttrpc)
        spec = kbs_spec(kbs, aa).replace("aa=grpc+unix://", "aa=unix://")
        with pytest.raises(TransportMismatch, match="speaks gRPC"):
            build_resolver(spec, cache_ttl=0).get_resource(R1)
        assert kbs.calls["auth"] == 0


def test_untimed_call_works(ttrpc_cdh: CdhServer) -> None:
    from coco_proto import confidential_data_hub_pb2 as pb

    client = TtrpcClient(ttrpc_cdh.socket_path)
    payload = pb.GetResourceRequest(ResourcePath=R1).SerializeToString()
    reply = client.call("api.GetResourceService", "GetResource", payload, timeout=None)
    assert pb.GetResourceResponse.FromString(reply).Resource == CDH_RESOURCES["default/key/1"]
    assert ttrpc_log(ttrpc_cdh)[0][3] == 0  # no deadline: timeout_nano 0
    client.close()


def test_grpc_spec_on_a_ttrpc_socket_says_ttrpc(ttrpc_aa: AaServer) -> None:
    assert sniff_transport(ttrpc_aa.socket_path) == "ttrpc"
    started = time.monotonic()
    with pytest.raises(TransportMismatch) as info:
        AaEvidenceProvider(f"grpc+unix://{ttrpc_aa.socket_path}").tee_type()
    assert time.monotonic() - started < 2  # not the 30 s gRPC deadline
    msg = str(info.value)
    assert "speaks ttrpc, not gRPC" in msg and "ttrpc+unix://" in msg and "\n" not in msg


def test_sniff_unknown_for_silent_or_absent_sockets() -> None:
    assert sniff_transport("/nonexistent/x.sock", 0.2) is None
    with short_tmpdir() as d:
        path = f"{d}/silent.sock"
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(path)
            listener.listen(4)
            assert sniff_transport(path, 0.2) is None  # accepts (backlog) but never answers


# --- address forms and defaults --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "transport", "address"),
    [
        ("unix:///run/a.sock", "ttrpc", "/run/a.sock"),
        ("ttrpc+unix:///run/a.sock", "ttrpc", "/run/a.sock"),
        ("/run/a.sock", "ttrpc", "/run/a.sock"),
        ("unix://@aa", "ttrpc", "@aa"),
        ("grpc+unix:///run/a.sock", "grpc", "unix:///run/a.sock"),
        ("127.0.0.1:50002", "grpc", "127.0.0.1:50002"),
    ],
)
def test_endpoint_forms(text: str, transport: str, address: str) -> None:
    ep = parse_endpoint(text)
    assert (ep.transport, ep.address) == (transport, address)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "relative.sock",
        "unix://relative",
        "tcp://h:1",
        "ttrpc+vsock://3:1",
        "grpc+tcp://h:1",
        "unix://@\x00",  # found by the long fuzz run: a NUL in an abstract name
        "grpc+unix://@a\x00b",
        "/run/a\x00.sock",
    ],
)
def test_bad_endpoints(text: str) -> None:
    with pytest.raises(ResolverError):
        parse_endpoint(text)


def test_spec_defaults_are_cocos_ttrpc_sockets() -> None:
    r = build_resolver("cdh:", cache_ttl=0)
    assert r.source.target == "ttrpc+unix:///run/confidential-containers/cdh.sock"
    r = build_resolver("kbs:http://127.0.0.1:1?insecure-http=true", cache_ttl=0)
    provider = r.source.evidence_provider
    assert provider.target == (
        "ttrpc+unix:///run/confidential-containers/attestation-agent/attestation-agent.sock"
    )
    with pytest.raises(ResolverError):
        build_resolver("kbs:http://127.0.0.1:1?insecure-http=true&aa=tcp://x:1")


def test_http2_settings_split_across_reads_is_still_recognised() -> None:
    """An HTTP/2 server whose SETTINGS frame arrives in pieces is still named as gRPC."""
    settings = b"\x00\x00\x06\x04\x00\x00\x00\x00\x00" + b"\x00\x05\x00\x00\x40\x00"
    with short_tmpdir() as d, socket.socket(socket.AF_UNIX) as listener:
        path = f"{d}/h2.sock"
        listener.bind(path)
        listener.listen(4)

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                for piece in (settings[:4], settings[4:]):
                    conn.sendall(piece)
                    time.sleep(0.05)
                time.sleep(1)

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        client = TtrpcClient(path)
        with pytest.raises(TransportMismatch, match="speaks gRPC"):
            client.call("s.S", "M", b"", timeout=0.5)
        client.close()
        t.join(3)
