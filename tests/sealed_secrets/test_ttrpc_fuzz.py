"""Property tests of the ttrpc frame parser and reply decoding: only typed errors escape.

The reply bytes come from the AA/CDH socket; whatever they are, a call ends in a payload,
a TtrpcError (a grpc.RpcError with a status code) or TransportMismatch, never a crash or a
hang past the deadline. Quick in every run; ``./run fuzz`` runs 100,000 cases each.
"""

from __future__ import annotations

import socket
import struct
import time

import grpc
from hypothesis import given
from hypothesis import strategies as st

from coco_proto import ttrpc_pb2
from sealed_secrets import ttrpc
from sealed_secrets.errors import ResolverError, TransportMismatch
from sealed_secrets.guest_rpc import GRPC, TTRPC, parse_endpoint
from tests.fuzzing import fuzz, long_fuzz

frames = st.lists(
    st.tuples(
        st.integers(0, 0xFFFFFFFF),
        st.integers(0, 255),
        st.integers(0, 255),
        st.binary(max_size=300),
    ),
    max_size=6,
)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


@long_fuzz
@fuzz(quick=300)
@given(st.binary(max_size=2000), st.lists(st.integers(0, 5000), max_size=8))
def test_frame_reader_on_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    reader = ttrpc.FrameReader()
    try:
        for chunk in _chunks(data, cuts):
            for frame in reader.feed(chunk):
                assert len(frame.body) <= ttrpc.MAX_MESSAGE
    except ttrpc.TtrpcError as exc:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        return
    assert reader.pending < ttrpc.HEADER_SIZE + ttrpc.MAX_MESSAGE


@long_fuzz
@fuzz(quick=300)
@given(frames, st.lists(st.integers(0, 5000), max_size=8))
def test_frame_round_trip_however_split(items: list, cuts: list[int]) -> None:
    wire = b"".join(ttrpc.encode_frame(*item) for item in items)
    reader = ttrpc.FrameReader()
    got = [f for chunk in _chunks(wire, cuts) for f in reader.feed(chunk)]
    assert [(f.stream_id, f.type, f.flags, f.body) for f in got] == items
    assert reader.pending == 0


@long_fuzz
@fuzz(quick=300)
@given(st.binary(max_size=400))
def test_decode_response_on_arbitrary_bytes(body: bytes) -> None:
    try:
        assert isinstance(ttrpc.decode_response(body), bytes)
    except ttrpc.TtrpcError as exc:
        assert isinstance(exc.code(), grpc.StatusCode)
        assert "\n" not in exc.details() and len(exc.details()) <= 200


@long_fuzz
@fuzz(quick=300)
@given(st.integers(-(2**31), 2**31 - 1), st.text(max_size=300), st.binary(max_size=50))
def test_status_codes_map_to_grpc_codes(code: int, message: str, payload: bytes) -> None:
    body = ttrpc_pb2.Response(
        status=ttrpc_pb2.Status(code=code, message=message), payload=payload
    ).SerializeToString()
    if code == 0:
        assert ttrpc.decode_response(body) == payload
        return
    try:
        ttrpc.decode_response(body)
    except ttrpc.TtrpcError as exc:
        expected = code if 1 <= code <= 16 else grpc.StatusCode.UNKNOWN.value[0]
        assert exc.code().value[0] == expected
        assert all(c.isprintable() for c in exc.details())
    else:
        raise AssertionError("a non-zero status must fail the call")


reply_bytes = st.one_of(
    st.binary(max_size=300),
    # a well-formed header for stream 1 with an arbitrary (often lying) length and body
    st.builds(
        lambda length, mtype, body: struct.pack(">IIBB", length, 1, mtype, 0) + body,
        st.integers(0, 2**32 - 1),
        st.integers(0, 255),
        st.binary(max_size=200),
    ),
)


@long_fuzz
@fuzz(quick=150)
@given(reply_bytes, st.integers(0, 9).map(lambda n: n > 0))
def test_client_call_against_hostile_reply(reply: bytes, close: bool) -> None:
    """The whole client path (reader thread, dispatch, decode) on what a server might send.

    Mostly the server then closes (EOF at once); one case in ten it stays silent, so an
    incomplete reply has to end at the deadline.
    """
    ours, theirs = socket.socketpair()
    conn = ttrpc._Connection("/fuzz.sock", ours)
    try:
        request = ttrpc.encode_request("s.S", "M", b"", 0.02)
        theirs.sendall(reply)
        if close:
            theirs.shutdown(socket.SHUT_WR)
        try:
            result = conn.call(request, time.monotonic() + 0.02)
        except (ttrpc.TtrpcError, TransportMismatch):
            return
        assert isinstance(result, bytes)
    finally:
        conn.close()
        theirs.close()


@long_fuzz
@fuzz(quick=300)
@given(
    st.one_of(
        st.text(max_size=80),
        st.builds(
            lambda a, b: a + b,
            st.sampled_from(["unix://", "ttrpc+unix://", "grpc+unix://", "/", "grpc+", ""]),
            st.text(max_size=60),
        ),
    )
)
def test_parse_endpoint_only_resolver_errors(text: str) -> None:
    try:
        ep = parse_endpoint(text)
    except ResolverError:
        return
    assert ep.transport in (TTRPC, GRPC)
    if ep.unix_path is not None:
        assert ep.unix_path.startswith(("/", "@")) and "\0" not in ep.unix_path
