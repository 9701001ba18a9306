"""Reach a CoCo guest component (AA, CDH) over the transport its address names.

Stock guests serve ttrpc on unix sockets; the ``grpc-aa``/``grpc-cdh`` builds serve gRPC
(usually on TCP). Address forms (resolver spec ``aa=…``, ``cdh:…``):

- ``unix:///abs/path``, ``ttrpc+unix:///abs/path``, ``/abs/path`` → ttrpc (CoCo's default);
  ``unix://@name`` is an abstract socket;
- ``grpc+unix:///abs/path`` and ``host:port`` → gRPC.

Both transports raise ``grpc.RpcError`` (``code()``/``details()``) so callers keep one
status-to-error table; a socket that speaks the other transport raises TransportMismatch.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from sealed_secrets.errors import ResolverError
from sealed_secrets.ttrpc import TtrpcClient, TtrpcError, mismatch, sniff_transport

TTRPC, GRPC = "ttrpc", "grpc"
_SNIFF_TIMEOUT = 0.5


@dataclass(frozen=True)
class Endpoint:
    transport: str  # TTRPC or GRPC
    address: str  # ttrpc: socket path ('@name' = abstract); gRPC: a grpcio target
    unix_path: str | None  # the socket path for either transport, None for TCP

    def __str__(self) -> str:
        if self.unix_path is None:
            return self.address
        return f"{self.transport}+unix://{self.unix_path}"


def _unix_path(rest: str, original: str) -> str:
    if "\0" in rest:  # also in an abstract name: neither transport can spell it
        raise ResolverError(f"socket address contains a NUL byte: {original!r}")
    if rest.startswith("@") and len(rest) > 1:
        return rest
    if not rest.startswith("/"):
        raise ResolverError(f"socket address needs an absolute path: {original!r}")
    return rest


def parse_endpoint(target: str) -> Endpoint:
    """Parse an AA/CDH address; plain ``unix://`` means ttrpc, as in guest-components."""
    if not isinstance(target, str) or not target.strip():
        raise ResolverError("empty AA/CDH socket address")
    target = target.strip()
    for prefix, transport in (
        ("ttrpc+unix://", TTRPC),
        ("grpc+unix://", GRPC),
        ("unix://", TTRPC),
    ):
        if target.startswith(prefix):
            path = _unix_path(target[len(prefix) :], target)
            if transport == GRPC:
                if path.startswith("@"):
                    return Endpoint(GRPC, f"unix-abstract:{path[1:]}", path)
                return Endpoint(GRPC, f"unix://{path}", path)
            return Endpoint(TTRPC, path, path)
    if target.startswith("/"):
        return Endpoint(TTRPC, _unix_path(target, target), target)
    if "://" in target or target.startswith(("ttrpc+", "grpc+")):
        raise ResolverError(
            f"unsupported AA/CDH address {target!r}: use unix:///path (ttrpc), "
            "ttrpc+unix:///path, grpc+unix:///path or host:port (gRPC)"
        )
    host, sep, port = target.rpartition(":")
    if sep and host and port.isdigit():
        return Endpoint(GRPC, target, None)
    raise ResolverError(
        f"AA/CDH address must be unix:///path, ttrpc+unix:///path, grpc+unix:///path or "
        f"host:port, got {target!r}"
    )


class GuestRpc:
    """Unary calls to one guest component; thread-safe; connections opened lazily."""

    def __init__(self, target: str) -> None:
        self.endpoint = parse_endpoint(target)
        self._lock = threading.Lock()
        self._ttrpc: TtrpcClient | None = None
        self._channel: grpc.Channel | None = None
        self._methods: dict[str, Any] = {}
        self._checked = False

    def __str__(self) -> str:
        return str(self.endpoint)

    def _grpc_method(self, path: str, response_type: Any) -> Any:
        with self._lock:
            # A ttrpc server never answers an HTTP/2 preface, so a gRPC call to it would only
            # time out; one cheap probe per client turns that into a clear error.
            sock = self.endpoint.unix_path
            if not self._checked and sock:
                speaks = sniff_transport(sock, _SNIFF_TIMEOUT)
                if speaks == TTRPC:
                    raise mismatch(sock, TTRPC)
                self._checked = speaks is not None  # absent socket: look again next time
            if self._channel is None:
                self._channel = grpc.insecure_channel(self.endpoint.address)
            if path not in self._methods:
                self._methods[path] = self._channel.unary_unary(
                    path,
                    request_serializer=lambda m: m.SerializeToString(),
                    response_deserializer=response_type.FromString,
                )
            return self._methods[path]

    def call(
        self, service: str, method: str, request: Any, response_type: Any, timeout: float
    ) -> Any:
        """``service``: full proto name, e.g. ``attestation_agent.AttestationAgentService``."""
        if self.endpoint.transport == GRPC:
            return self._grpc_method(f"/{service}/{method}", response_type)(
                request, timeout=timeout
            )
        with self._lock:
            if self._ttrpc is None:
                self._ttrpc = TtrpcClient(self.endpoint.address)
            client = self._ttrpc
        payload = client.call(service, method, request.SerializeToString(), timeout=timeout)
        try:
            return response_type.FromString(payload)
        except (DecodeError, RecursionError):
            raise TtrpcError(
                grpc.StatusCode.INTERNAL, f"undecodable {method} reply payload"
            ) from None

    def close(self) -> None:
        with self._lock:
            if self._ttrpc is not None:
                self._ttrpc.close()
            if self._channel is not None:
                self._channel.close()
            self._ttrpc = None
            self._channel = None
            self._methods.clear()
