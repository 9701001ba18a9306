"""Typed driver failures, each bound to the status code the CSI spec prescribes.

The core raises these; the thin gRPC servicers turn them into status codes (csi_driver/rpc.py
maps ``Code`` to grpc.StatusCode by name), so the core never imports grpc. Messages are
always safe to log and to return to the CO: they name volumes and paths, never key material,
secrets or volume_context values.
"""

from __future__ import annotations

import enum


class Code(enum.Enum):
    """The gRPC status codes the driver uses (names as in grpc.StatusCode)."""

    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    INTERNAL = 13
    UNAVAILABLE = 14


class CsiError(Exception):
    """Base: a failure with a CSI/gRPC status code."""

    code: Code = Code.INTERNAL


class InvalidArgument(CsiError):
    code = Code.INVALID_ARGUMENT


class NotFound(CsiError):
    code = Code.NOT_FOUND


class AlreadyExists(CsiError):
    code = Code.ALREADY_EXISTS


class FailedPrecondition(CsiError):
    code = Code.FAILED_PRECONDITION


class OutOfRange(CsiError):
    code = Code.OUT_OF_RANGE


class PermissionDenied(CsiError):
    code = Code.PERMISSION_DENIED


class Unavailable(CsiError):
    code = Code.UNAVAILABLE


class ResourceExhausted(CsiError):
    code = Code.RESOURCE_EXHAUSTED


class Internal(CsiError):
    code = Code.INTERNAL


class MountError(Internal):
    """A mount daemon failed to start or to become ready."""


class WrongVolumeKey(FailedPrecondition):
    """The derived or unsealed key does not open the volume's gocryptfs.conf."""


class Aborted(CsiError):
    """Another operation on the same target or volume is still in progress (CSI: retry)."""

    code = Code.ABORTED


class DeadlineExceeded(CsiError):
    """The caller's gRPC deadline ran out; whatever this call started was undone."""

    code = Code.DEADLINE_EXCEEDED
