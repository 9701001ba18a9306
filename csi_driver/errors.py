"""Typed driver failures, each bound to the gRPC status code the CSI spec prescribes.

The core raises these; the thin gRPC servicers turn them into status codes. Messages are
always safe to log and to return to the CO: they name volumes and paths, never key material,
secrets or volume_context values.
"""

from __future__ import annotations

import grpc


class CsiError(Exception):
    """Base: a failure with a CSI/gRPC status code."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(CsiError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(CsiError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(CsiError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(CsiError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class OutOfRange(CsiError):
    code = grpc.StatusCode.OUT_OF_RANGE


class PermissionDenied(CsiError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(CsiError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(CsiError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Internal(CsiError):
    code = grpc.StatusCode.INTERNAL


class MountError(Internal):
    """A mount daemon failed to start or to become ready."""


class WrongVolumeKey(FailedPrecondition):
    """The derived or unsealed key does not open the volume's gocryptfs.conf."""


class Aborted(CsiError):
    """Another operation on the same target or volume is still in progress (CSI: retry)."""

    code = grpc.StatusCode.ABORTED


class DeadlineExceeded(CsiError):
    """The caller's gRPC deadline ran out; whatever this call started was undone."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
