"""A containerd/ttrpc client: how stock CoCo guests serve the Attestation Agent and CDH.

Wire format (containerd/ttrpc PROTOCOL.md; docs reference/ttrpc.md): a 10-byte big-endian
header ``length u32 | stream id u32 | type u8 | flags u8`` followed by ``length`` bytes (at
most 4 MiB); a unary call is one Request frame on a fresh odd stream id and one Response
frame back on the same id, whose ``status`` is a google.rpc.Status (absent or code 0 =
success). Calls are multiplexed on one connection, so replies are matched by stream id.

Failures are :class:`TtrpcError`, a ``grpc.RpcError`` with ``code()``/``details()``, so the
AA and CDH clients map ttrpc and gRPC failures to the same typed errors through one table.
A socket that answers in HTTP/2 raises :class:`TransportMismatch` instead: that is a spec
mistake the operator must fix, and the message says which transport the socket speaks.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from coco_proto import ttrpc_pb2
from sealed_secrets.errors import TransportMismatch

MAX_MESSAGE = 4 << 20  # containerd/ttrpc and ttrpc-rust: 4 MiB of data after the header
HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size
TYPE_REQUEST, TYPE_RESPONSE, TYPE_DATA = 1, 2, 3
FLAG_REMOTE_CLOSED, FLAG_REMOTE_OPEN, FLAG_NO_DATA = 1, 2, 4
MAX_STREAM_ID = 0xFFFFFFFF
_CODES = {code.value[0]: code for code in grpc.StatusCode}
_DETAIL_MAX = 200
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_PROBE_SERVICE = "coco_csi.TransportProbe"


class TtrpcError(grpc.RpcError):
    """A failed ttrpc call: a google.rpc status code (as ``grpc.StatusCode``) and its text."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self._code = code
        self._details = "".join(c for c in message if c.isprintable())[:_DETAIL_MAX]
        super().__init__(f"ttrpc {code.name}: {self._details}")

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def status_code(value: int) -> grpc.StatusCode:
    """google.rpc.Code number → ``grpc.StatusCode`` (numbers outside 0..16 are UNKNOWN)."""
    return _CODES.get(value, grpc.StatusCode.UNKNOWN)


# --- frames -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    stream_id: int
    type: int
    flags: int
    body: bytes


def _oversized(length: int) -> TtrpcError:
    return TtrpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"message length {length} exceeds maximum message size of {MAX_MESSAGE}",
    )


def encode_frame(stream_id: int, mtype: int, flags: int, body: bytes) -> bytes:
    """Header + body; refuses what a ttrpc peer would reject as oversized."""
    if len(body) > MAX_MESSAGE:
        raise _oversized(len(body))
    return HEADER.pack(len(body), stream_id, mtype, flags) + body


def looks_like_http2(data: bytes) -> bool:
    """True if ``data`` starts with the SETTINGS or GOAWAY frame an HTTP/2 server sends.

    HTTP/2 frame: length u24, type u8, flags u8, stream id u32 (0 for connection frames).
    A ttrpc reply to an odd client stream can never have bytes 5..8 all zero.
    """
    return len(data) >= 9 and data[3] in (0x04, 0x07) and data[5:9] == b"\x00\x00\x00\x00"


class FrameReader:
    """Incremental parser: feed received bytes, get whole frames back.

    Buffers at most one header, one maximal body and one ``recv`` chunk: a header announcing
    more than MAX_MESSAGE fails at once (RESOURCE_EXHAUSTED) instead of being waited for.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.received = 0

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held (non-zero at EOF = closed mid-reply)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        self.received += len(data)
        frames: list[Frame] = []
        while len(self._buf) >= HEADER_SIZE:
            length, stream_id, mtype, flags = HEADER.unpack_from(self._buf)
            if length > MAX_MESSAGE:
                raise _oversized(length)
            end = HEADER_SIZE + length
            if len(self._buf) < end:
                break
            frames.append(Frame(stream_id, mtype, flags, bytes(self._buf[HEADER_SIZE:end])))
            del self._buf[:end]
        return frames


def encode_request(
    service: str,
    method: str,
    payload: bytes,
    timeout: float | None = None,
    metadata: Iterable[tuple[str, str]] = (),
) -> bytes:
    """The Request message; ``timeout`` becomes ``timeout_nano`` (0 = no deadline)."""
    nanos = 0 if timeout is None else max(1, int(timeout * 1e9))
    data: bytes = ttrpc_pb2.Request(
        service=service,
        method=method,
        payload=payload,
        timeout_nano=nanos,
        metadata=[ttrpc_pb2.KeyValue(key=k, value=v) for k, v in metadata],
    ).SerializeToString()
    return data


def decode_response(body: bytes) -> bytes:
    """Payload of a successful Response; a TtrpcError with the server's status otherwise."""
    try:
        resp = ttrpc_pb2.Response.FromString(body)
    except (DecodeError, RecursionError):
        raise TtrpcError(grpc.StatusCode.INTERNAL, "undecodable ttrpc Response") from None
    if resp.HasField("status") and resp.status.code != 0:
        raise TtrpcError(status_code(resp.status.code), resp.status.message)
    return bytes(resp.payload)


# --- connection -------------------------------------------------------------------------------


def socket_address(path: str) -> str:
    """``@name`` is a Linux abstract socket (as ttrpc-rust's ``unix://@name``)."""
    return "\0" + path[1:] if path.startswith("@") else path


def _connect(path: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(max(timeout, 0.001))
    try:
        sock.connect(socket_address(path))
    except TimeoutError:
        sock.close()
        raise TtrpcError(
            grpc.StatusCode.DEADLINE_EXCEEDED, f"connect to {path} timed out"
        ) from None
    except OSError as exc:
        sock.close()
        reason = exc.strerror or type(exc).__name__
        raise TtrpcError(
            grpc.StatusCode.UNAVAILABLE, f"cannot connect to {path}: {reason}"
        ) from None
    sock.settimeout(None)  # the reader blocks; sends poll with the caller's deadline
    return sock


def _remaining(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)


class _Waiter:
    __slots__ = ("event", "body", "error")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.body: bytes | None = None
        self.error: BaseException | None = None


class _Connection:
    """One socket: a reader thread dispatches Response frames to waiting calls by stream id."""

    def __init__(self, path: str, sock: socket.socket) -> None:
        self.path = path
        self.sock = sock
        self.lock = threading.Lock()
        self.write_lock = threading.Lock()
        self.pending: dict[int, _Waiter] = {}
        self.next_id = 1
        self.error: BaseException | None = None
        self.reader = FrameReader()
        self.silent_close = False  # closed without sending a single byte
        #: the peer closed while we were still sending: a gRPC server does that after its
        #: own SETTINGS/GOAWAY, and our reader may not have seen those bytes yet
        self.send_failed = False
        self._head: bytes | None = b""  # first bytes, until they rule out an HTTP/2 server
        self._thread = threading.Thread(target=self._read_loop, name="ttrpc-reader", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self.error is None

    def _fail(self, error: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = error
            waiters = list(self.pending.values())
            self.pending.clear()
        for waiter in waiters:
            waiter.error = error
            waiter.event.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._fail(TtrpcError(grpc.StatusCode.CANCELLED, "ttrpc client closed"))
        self.sock.close()

    def _read_loop(self) -> None:
        try:
            while True:
                try:
                    data = self.sock.recv(65536)
                except OSError as exc:
                    reason = exc.strerror or type(exc).__name__
                    self._fail(TtrpcError(grpc.StatusCode.UNAVAILABLE, f"read failed: {reason}"))
                    return
                if not data:
                    self._fail(self._eof_error())
                    return
                if self._head is not None:
                    self._head += data
                    if looks_like_http2(self._head):
                        self._fail(mismatch(self.path, "grpc"))
                        return
                    if len(self._head) >= 9:
                        self._head = None
                for frame in self.reader.feed(data):
                    self._dispatch(frame)
        except TtrpcError as exc:  # oversized frame: the stream is lost, and framing with it
            self._fail(exc)
        except Exception as exc:  # a bug must not leave callers waiting on a dead reader
            self._fail(TtrpcError(grpc.StatusCode.INTERNAL, f"reader failed: {type(exc).__name__}"))

    def _eof_error(self) -> TtrpcError:
        if self.reader.received == 0:
            self.silent_close = True
            return TtrpcError(
                grpc.StatusCode.UNAVAILABLE, f"{self.path} closed the connection without a reply"
            )
        if self.reader.pending:
            return TtrpcError(
                grpc.StatusCode.UNAVAILABLE, f"{self.path} closed the connection mid-reply"
            )
        return TtrpcError(grpc.StatusCode.UNAVAILABLE, f"{self.path} closed the connection")

    def _dispatch(self, frame: Frame) -> None:
        with self.lock:
            waiter = self.pending.pop(frame.stream_id, None)
        if waiter is None:  # late reply to a call that timed out, or a server stream: drop
            return
        if frame.type == TYPE_RESPONSE:
            try:
                waiter.body = decode_response(frame.body)
            except TtrpcError as exc:
                waiter.error = exc
        else:
            waiter.error = TtrpcError(
                grpc.StatusCode.INTERNAL, f"unexpected ttrpc frame type {frame.type} for a call"
            )
        waiter.event.set()

    def _send(self, frame: bytes, deadline: float | None) -> None:
        """Write one whole frame by ``deadline``; a half-written frame poisons the connection."""
        if not self.write_lock.acquire(timeout=-1 if deadline is None else _remaining(deadline)):
            raise TtrpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before send")
        try:
            view = memoryview(frame)
            while view:
                wait = None if deadline is None else _remaining(deadline)
                if not select.select([], [self.sock], [], wait)[1]:
                    error = TtrpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline hit in send")
                    if len(view) < len(frame):  # the peer would read the rest as a new frame
                        self._fail(error)
                    raise error
                try:
                    sent = self.sock.send(view, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    reason = exc.strerror or type(exc).__name__
                    error = TtrpcError(grpc.StatusCode.UNAVAILABLE, f"send failed: {reason}")
                    self.send_failed = True
                    self._fail(error)
                    raise error from None
                view = view[sent:]
        finally:
            self.write_lock.release()

    def call(self, request: bytes, deadline: float | None) -> bytes:
        if len(request) > MAX_MESSAGE:  # refused before a stream id is spent
            raise _oversized(len(request))
        waiter = _Waiter()
        with self.lock:
            if self.error is not None:
                raise self.error
            stream_id = self.next_id
            if stream_id > MAX_STREAM_ID:
                self.error = TtrpcError(grpc.StatusCode.UNAVAILABLE, "stream ids exhausted")
                raise self.error
            self.next_id += 2
            self.pending[stream_id] = waiter
        try:
            frame = encode_frame(stream_id, TYPE_REQUEST, 0, request)
            self._send(frame, deadline)
            if not waiter.event.wait(None if deadline is None else _remaining(deadline)):
                raise TtrpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "no reply before the deadline")
        finally:
            with self.lock:
                self.pending.pop(stream_id, None)
        if waiter.error is not None:
            raise waiter.error
        assert waiter.body is not None
        return waiter.body


def mismatch(path: str, speaks: str) -> TransportMismatch:
    """The one-line error for a socket that speaks the other transport."""
    if speaks == "grpc":
        return TransportMismatch(
            f"{path} speaks gRPC (HTTP/2), not ttrpc: use grpc+unix://{path} in the resolver spec"
        )
    return TransportMismatch(
        f"{path} speaks ttrpc, not gRPC: use ttrpc+unix://{path} (or unix://{path}) "
        "in the resolver spec"
    )


class TtrpcClient:
    """Unary ttrpc calls to one unix socket; thread-safe, one multiplexed connection.

    The connection is opened on first use and re-opened after it fails, so a restarted AA or
    CDH is picked up by the next call. Stream ids are odd and increase per connection.
    """

    def __init__(self, path: str, *, connect_timeout: float = 5.0) -> None:
        self.path = path
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._conn: _Connection | None = None

    def __repr__(self) -> str:
        return f"TtrpcClient(path={self.path!r})"

    def _connection(self, deadline: float | None) -> _Connection:
        with self._lock:
            if self._conn is None or not self._conn.alive:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
                budget = self.connect_timeout
                if deadline is not None:
                    budget = min(budget, deadline - time.monotonic())
                if budget <= 0:
                    raise TtrpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline before connect")
                self._conn = _Connection(self.path, _connect(self.path, budget))
            return self._conn

    def call(
        self,
        service: str,
        method: str,
        payload: bytes,
        *,
        timeout: float | None,
        metadata: Iterable[tuple[str, str]] = (),
    ) -> bytes:
        """Send one request, return the reply payload; TtrpcError/TransportMismatch on failure."""
        deadline = None if timeout is None else time.monotonic() + timeout
        request = encode_request(service, method, payload, timeout, metadata)
        conn = self._connection(deadline)
        try:
            return conn.call(request, deadline)
        except TtrpcError as exc:
            unanswered = conn.silent_close or conn.send_failed
            closed = unanswered and exc.code() == grpc.StatusCode.UNAVAILABLE
            if closed and sniff_transport(self.path, 0.5) == "grpc":
                raise mismatch(self.path, "grpc") from None
            raise

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
            self._conn = None


def _read_some(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(max(timeout, 0.001))
    try:
        return sock.recv(64)
    except OSError:  # timeout, reset
        return b""


def sniff_transport(path: str, timeout: float = 0.5) -> str | None:
    """Guess what a unix socket speaks: ``"ttrpc"``, ``"grpc"`` or None (unknown/unreachable).

    gRPC servers usually send SETTINGS as soon as a client connects; a ttrpc server never
    speaks first but answers any Request (an unknown service gets an error Response). The
    HTTP/2 preface is sent only on a second connection, after the ttrpc probe got nothing,
    because a ttrpc server reads it as an oversized frame and hangs (reference/ttrpc.md 5).
    """
    try:
        sock = _connect(path, timeout)
    except TtrpcError:
        return None
    with sock:
        first = _read_some(sock, min(timeout, 0.1))
        if looks_like_http2(first):
            return "grpc"
        if first:
            return None
        body = encode_request(_PROBE_SERVICE, "Probe", b"", timeout)
        try:
            sock.sendall(encode_frame(1, TYPE_REQUEST, 0, body))
        except OSError:
            return None
        reply = _read_some(sock, timeout)
        if len(reply) >= HEADER_SIZE and HEADER.unpack_from(reply)[1:3] == (1, TYPE_RESPONSE):
            return "ttrpc"
        if looks_like_http2(reply):
            return "grpc"
    try:
        sock = _connect(path, timeout)
    except TtrpcError:
        return None
    with sock:
        try:
            sock.sendall(_HTTP2_PREFACE)
        except OSError:
            return None
        return "grpc" if looks_like_http2(_read_some(sock, timeout)) else None
