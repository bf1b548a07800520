"""The one error table: domain exceptions and the gRPC status each becomes.

Server code raises these; :func:`to_status` (used by the one interceptor in
``interceptors.py``) turns any exception into ``(code, message)``. Anything
that is not a :class:`ServeError` is a bug: INTERNAL with a generic message,
traceback in the log.
"""

from __future__ import annotations

import logging

import grpc

log = logging.getLogger(__name__)


class ServeError(Exception):
    """Base of every error the server reports to its caller as is."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(ServeError):
    """Bad input: wrong count/dtype/shape, malformed bytes, bad weight names or shapes."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServeError):
    """Unknown model (or constant where the API looks one up by name)."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServeError):
    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhausted(ServeError):
    """Queue full, or a configured size bound exceeded."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServeError):
    """Not ready, unloading or draining: try again (elsewhere)."""

    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(ServeError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServeError):
    """Wrong admin token, or a path outside the allowed roots."""

    code = grpc.StatusCode.PERMISSION_DENIED


class FailedPrecondition(ServeError):
    """The call is valid but not in the model's current state (e.g. swap with nothing staged)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(ServeError):
    """A concurrent change got in the way (e.g. the weights changed during a download): retry."""

    code = grpc.StatusCode.ABORTED


class DeadlineExceeded(ServeError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ServeError):
    code = grpc.StatusCode.CANCELLED


class Unimplemented(ServeError):
    """A protocol feature aotiserve does not offer (BYTES tensors, shared memory, ...)."""

    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(ServeError):
    """A failure we understand but the caller cannot fix (message is safe to show)."""

    code = grpc.StatusCode.INTERNAL


GENERIC_INTERNAL = "internal error; see the server log"


# A status message travels in the grpc-message trailer, percent-encoded (up to 3 bytes
# per byte); clients refuse trailers past 8-16 KiB and then report RESOURCE_EXHAUSTED
# instead of the real error. Messages repeat what the caller sent (a model name, an
# input name), so they are clipped to this many UTF-8 bytes (the port clips the same).
MAX_MESSAGE_BYTES = 1536
_CLIP_HEAD, _CLIP_TAIL = 1024, 384


def clip(message: str) -> str:
    """``message`` within :data:`MAX_MESSAGE_BYTES`: its head and tail, and how much of
    the middle was left out."""
    raw = message.encode()
    if len(raw) <= MAX_MESSAGE_BYTES:
        return message
    head = raw[:_CLIP_HEAD].decode(errors="ignore")
    tail = raw[-_CLIP_TAIL:].decode(errors="ignore")
    left_out = len(raw) - _CLIP_HEAD - _CLIP_TAIL
    return f"{head}…[{left_out} bytes left out]…{tail}"


def to_status(exc: BaseException, where: str = "") -> tuple[grpc.StatusCode, str]:
    """The status code and message a caller sees for ``exc``; logs unexpected ones."""
    if isinstance(exc, ServeError):
        if exc.code == grpc.StatusCode.INTERNAL:
            log.error("%s failed: %s", where or "call", clip(exc.message), exc_info=exc)
        return exc.code, clip(exc.message)
    log.error("%s failed with an unexpected error", where or "call", exc_info=exc)
    return grpc.StatusCode.INTERNAL, GENERIC_INTERNAL
