"""Errors the client raises: one exception class per gRPC status code.

Every failed call raises :class:`ClientError` or the subclass for its code, so
callers either catch everything (``except ClientError``) or exactly the case
they handle (``except NotFoundError``). ``.code`` is the ``grpc.StatusCode``
and ``.details`` the server's message, unchanged.
"""

from __future__ import annotations

import grpc

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "CancelledError",
    "ClientError",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "error_for",
    "from_rpc_error",
]


class ClientError(Exception):
    """A call failed. ``code`` is a ``grpc.StatusCode``, ``details`` the server's message."""

    #: The status code this class stands for (the base class takes any).
    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        details: str = "",
        code: grpc.StatusCode | None = None,
        *,
        trailing_metadata: tuple = (),
    ) -> None:
        self.code: grpc.StatusCode = code if code is not None else self.default_code
        self.details: str = details
        self.trailing_metadata = tuple(trailing_metadata or ())
        super().__init__(details)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}" if self.details else self.code.name

    def __reduce__(self):
        return (error_for, (self.code, self.details))


class CancelledError(ClientError):
    default_code = grpc.StatusCode.CANCELLED


class UnknownError(ClientError):
    default_code = grpc.StatusCode.UNKNOWN


class InvalidArgumentError(ClientError):
    default_code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceededError(ClientError):
    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFoundError(ClientError):
    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(ClientError):
    default_code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(ClientError):
    default_code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(ClientError):
    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(ClientError):
    default_code = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(ClientError):
    default_code = grpc.StatusCode.ABORTED


class OutOfRangeError(ClientError):
    default_code = grpc.StatusCode.OUT_OF_RANGE


class UnimplementedError(ClientError):
    default_code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(ClientError):
    default_code = grpc.StatusCode.INTERNAL


class UnavailableError(ClientError):
    default_code = grpc.StatusCode.UNAVAILABLE


class DataLossError(ClientError):
    default_code = grpc.StatusCode.DATA_LOSS


class UnauthenticatedError(ClientError):
    default_code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: dict[grpc.StatusCode, type[ClientError]] = {
    cls.default_code: cls
    for cls in (
        CancelledError,
        UnknownError,
        InvalidArgumentError,
        DeadlineExceededError,
        NotFoundError,
        AlreadyExistsError,
        PermissionDeniedError,
        ResourceExhaustedError,
        FailedPreconditionError,
        AbortedError,
        OutOfRangeError,
        UnimplementedError,
        InternalError,
        UnavailableError,
        DataLossError,
        UnauthenticatedError,
    )
}


def error_for(
    code: grpc.StatusCode, details: str = "", *, trailing_metadata: tuple = ()
) -> ClientError:
    """The exception for a status code (the base class for codes without a subclass)."""
    cls = _BY_CODE.get(code, ClientError)
    return cls(details, code, trailing_metadata=trailing_metadata)


def from_rpc_error(error: grpc.RpcError) -> ClientError:
    """Converts a grpc (sync or aio) call error into the matching ClientError."""
    code = error.code() if callable(getattr(error, "code", None)) else None
    details = error.details() if callable(getattr(error, "details", None)) else None
    trailing = ()
    if callable(getattr(error, "trailing_metadata", None)):
        try:
            trailing = error.trailing_metadata() or ()
        except Exception:  # aio errors raise when the call never started
            trailing = ()
    return error_for(code or grpc.StatusCode.UNKNOWN, details or "", trailing_metadata=trailing)
