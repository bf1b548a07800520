"""The one interceptor of the calls answered in Python: errors → status codes, request
metrics, admin auth.

Every call the port hands to Python (server/bridge.py) goes through
:class:`ServingInterceptor`,
so no servicer has try/except for status codes: raise ``errors.ServeError``
(or let anything else escape, which becomes INTERNAL with the traceback logged).

Who may call a mutating RPC (:data:`MUTATING_METHODS`):
- an admin token is configured: callers presenting it (missing → UNAUTHENTICATED,
  wrong → PERMISSION_DENIED), from loopback only with ``admin_loopback_only``;
- only an inference token is configured: nobody (PERMISSION_DENIED: a daemon
  guarded by a token is never open to changes that need none);
- no token at all: loopback peers only, unless ``insecure_admin``.
Each refusal is logged, one line per reason at most once a minute.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from aotiserve.client import wire

from . import peer_connections
from .errors import (
    InvalidArgument,
    PermissionDenied,
    ServeError,
    Unauthenticated,
    to_status,
)
from .log_limit import OncePerInterval
from .metrics import Metrics

log = logging.getLogger(__name__)

# RPCs that change what the server serves: they need the admin token when one is set.
MUTATING_METHODS = frozenset(
    {
        "/aotiserve.v1.ModelRunner/LoadModel",
        "/aotiserve.v1.ModelRunner/UnloadModel",
        "/aotiserve.v1.ModelRunner/UpdateConstantBuffer",
        "/aotiserve.v1.ModelRunner/SwapConstantBuffer",
        "/aotiserve.v1.ModelRunner/RollbackConstantBuffer",
        "/aotiserve.v1.ModelRunner/FreeInactiveConstantBuffer",
        "/aotiserve.v1.ModelRunner/UpdateConstantBufferFromBlob",
        "/aotiserve.v1.ModelRunner/LoadWeights",
        "/aotiserve.v1.ModelRunner/LoadWeightsFromCuda",
        "/inference.GRPCInferenceService/RepositoryModelLoad",
        "/inference.GRPCInferenceService/RepositoryModelUnload",
        # Shared-memory registration changes what the daemon maps (status is a read).
        "/inference.GRPCInferenceService/SystemSharedMemoryRegister",
        "/inference.GRPCInferenceService/SystemSharedMemoryUnregister",
        "/inference.GRPCInferenceService/CudaSharedMemoryRegister",
        "/inference.GRPCInferenceService/CudaSharedMemoryUnregister",
    }
)

# Services open to every caller (probes, tooling), token or not.
_ALWAYS_ON = ("/grpc.health.v1.Health/", "/grpc.reflection.")

# Requests parsed by protobuf (control RPCs, health, reflection) hold a few fields each.
TOP_LEVEL_BOUNDS = wire.Bounds()

_MODEL_FIELDS = ("model", "model_name", "name")
# The model label of requests naming a model the server does not hold.
UNKNOWN_MODEL_LABEL = "<unknown>"


@dataclass
class CallInfo:
    method: str
    model: str = ""
    is_admin: bool = False
    counted: bool = False


_current = threading.local()


def current_call() -> CallInfo | None:
    """The call being handled on this thread (servicers set ``.model`` for streams)."""
    return getattr(_current, "call", None)


def set_call_model(model: str) -> None:
    call = current_call()
    if call is not None:
        call.model = model


def call_deadline(context: Any) -> float | None:
    """The call's deadline as a time.monotonic() instant (None: it has none)."""
    remaining = context.time_remaining()
    # grpc reports "no deadline" as an enormous remaining time.
    if remaining is None or remaining > 1e7:
        return None
    return time.monotonic() + remaining


def _model_of(request: Any) -> str:
    for f in _MODEL_FIELDS:
        value = getattr(request, f, None)
        if isinstance(value, str):
            return value
    return ""


class _RefusalLog:
    """Logs why mutating calls are refused: one line per reason, then at most one a
    minute with the count held back meanwhile (refused calls cannot flood the log)."""

    def __init__(self):
        self._limit = OncePerInterval()

    def note(self, reason: str, peer: str, why: str) -> None:
        def emit(more: str) -> None:
            log.warning("refused a mutating call from %s: %s%s", peer, why, more)

        self._limit.note(reason, emit)


class ServingInterceptor:
    def __init__(
        self,
        metrics: Metrics | None,
        admin_token: str | None,
        is_model: Callable[[str], bool] | None = None,
        *,
        inference_token: str | None = None,
        admin_loopback_only: bool = False,
        insecure_admin: bool = False,
    ):
        """``insecure_admin``: with no token at all, mutating RPCs from any peer."""
        self.metrics = metrics
        self._inference_token = inference_token.encode() if inference_token else None
        self._admin_loopback_only = admin_loopback_only
        self._insecure_admin = insecure_admin
        self._refusals = _RefusalLog()
        # Metric labels name only models the server holds: a name from the request is
        # the caller's choice, and one series per made-up name would grow without bound.
        self._is_model = is_model
        self._token = admin_token.encode() if admin_token else None
        # (method, admin_rpcs) → (gRPC's handler, the wrapped handler).
        self._wrapped: dict[tuple, tuple] = {}

    def _authorize(
        self, method: str, metadata, peer: Callable[[], str], always_on: bool, admin_rpcs: bool
    ) -> bool:
        """Whether the caller holds the admin token; raises if the call is not allowed."""
        header = None
        for key, value in metadata or ():
            if key == "authorization":
                header = value
        if method in MUTATING_METHODS:
            if not admin_rpcs:
                raise self._refuse(
                    "admin port",
                    peer,
                    PermissionDenied(
                        f"{method}: this server takes admin RPCs on its admin port only"
                    ),
                )
            if self._admin_loopback_only and not _is_loopback(peer()):
                raise self._refuse(
                    "loopback only",
                    peer,
                    PermissionDenied(f"{method}: this server takes admin RPCs from loopback only"),
                )
            if self._token is None:
                if self._inference_token is not None:
                    raise self._refuse(
                        "no admin token",
                        peer,
                        PermissionDenied(
                            f"{method}: this daemon has no admin token configured, so mutating "
                            "RPCs are refused (it has an inference token; configure "
                            "--admin-token-file)"
                        ),
                    )
                if not self._insecure_admin and not _is_loopback(peer()):
                    raise self._refuse(
                        "no token, not loopback",
                        peer,
                        PermissionDenied(
                            f"{method}: this daemon has no admin token configured, so it takes "
                            "mutating RPCs from loopback only (configure --admin-token-file, or "
                            "start it with --insecure-admin)"
                        ),
                    )
                return False
            if header is None:
                raise self._refuse(
                    "token missing",
                    peer,
                    Unauthenticated(
                        f"{method} needs the admin token (metadata 'authorization: Bearer <token>')"
                    ),
                )
            if not self._check(header, self._token):
                raise self._refuse(
                    "wrong token", peer, PermissionDenied(f"{method}: wrong admin token")
                )
            return True
        is_admin = (
            header is not None and self._token is not None and self._check(header, self._token)
        )
        if self._inference_token is not None and not always_on and not is_admin:
            if header is None:
                raise Unauthenticated(
                    f"{method} needs a token (metadata 'authorization: Bearer <token>')"
                )
            if not self._check(header, self._inference_token):
                raise PermissionDenied(f"{method}: wrong token")
        return is_admin

    def _refuse(self, reason: str, peer: Callable[[], str], error: ServeError) -> ServeError:
        """``error``, once logged (see :class:`_RefusalLog`)."""
        self._refusals.note(reason, peer(), error.message)
        return error

    @staticmethod
    def _check(header: str, want: bytes) -> bool:
        token = header[7:] if header.startswith("Bearer ") else header
        return hmac.compare_digest(token.encode(), want)

    def intercept_for(self, continuation, handler_call_details, admin_rpcs: bool):
        """The handler of a call that came through a listener taking mutating RPCs
        (``admin_rpcs``) or not, wrapped; None for a method nobody serves."""
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        # gRPC asks for the handler on every call: the wrapped one is built once per
        # method (it reads the call's metadata from its context, not from here).
        key = (handler_call_details.method, admin_rpcs)
        cached = self._wrapped.get(key)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, handler_call_details.method, admin_rpcs)
        self._wrapped[key] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler, method: str, admin_rpcs: bool):
        short = method.rsplit("/", 1)[-1]
        always_on = method.startswith(_ALWAYS_ON)

        def start(context) -> CallInfo:
            call = CallInfo(method=short)  # the model is set once the request is decoded
            _current.call = call
            if self.metrics:
                self.metrics.stats.add_in_flight(short, 1)
                call.counted = True
            call.is_admin = self._authorize(
                method, context.invocation_metadata(), context.peer, always_on, admin_rpcs
            )
            return call

        def finish(call: CallInfo, code: grpc.StatusCode, began: float) -> None:
            _current.call = None
            if self.metrics:
                if call.counted:
                    self.metrics.stats.add_in_flight(short, -1)
                model = call.model
                if model and self._is_model is not None and not self._is_model(model):
                    model = UNKNOWN_MODEL_LABEL
                self.metrics.stats.record_request(
                    model, short, code.value[0], time.monotonic() - began
                )

        # Requests are parsed here, not by gRPC: grpcio (1.85) leaks ~19 KB per request
        # its deserializer refuses (the call state is never freed, not even when the
        # connection closes), so any client could grow the daemon's memory with garbage
        # bytes. Parsed here, a bad message is one INVALID_ARGUMENT and nothing kept.
        # A deserializer that refuses with a ServeError (a bound passed) says why. One that
        # does not count what it reads (protobuf's: an object or a copy per repeated
        # field) gets bytes of at most TOP_LEVEL_BOUNDS.max_fields top-level fields.
        deserialize = handler.request_deserializer
        counts = getattr(deserialize, "bounded", False)

        def decode(raw):
            if deserialize is None:
                return raw
            try:
                if not counts:
                    wire.check_bounds(raw, {}, TOP_LEVEL_BOUNDS, f"the {short} request")
                return deserialize(raw)
            except wire.BoundError as exc:
                raise InvalidArgument(str(exc)) from None
            except ServeError:
                raise
            except Exception:  # noqa: BLE001 (DecodeError, RecursionError...)
                raise InvalidArgument(f"{short}: the request is not a valid message") from None

        def fail(context, exc: BaseException) -> None:
            if isinstance(exc, grpc.RpcError) and not context.is_active():
                return  # the client went away (e.g. cancelled an upload): nobody to tell
            code, message = to_status(exc, short)
            context.abort(code, message)

        if handler.unary_unary:
            inner = handler.unary_unary

            def unary_unary(raw, context):
                began = time.monotonic()
                call, code = CallInfo(short), grpc.StatusCode.INTERNAL
                try:
                    call = start(context)
                    request = decode(raw)
                    call.model = _model_of(request)
                    response = inner(request, context)
                    code = grpc.StatusCode.OK
                    return response
                except Exception as exc:  # noqa: BLE001 (the one place errors become codes)
                    code = _code(exc)
                    fail(context, exc)
                finally:
                    finish(call, code, began)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, None, handler.response_serializer
            )

        if handler.unary_stream:
            inner_us = handler.unary_stream

            def unary_stream(raw, context):
                began = time.monotonic()
                call, code = CallInfo(short), grpc.StatusCode.CANCELLED
                try:
                    call = start(context)
                    request = decode(raw)
                    call.model = _model_of(request)
                    yield from inner_us(request, context)
                    code = grpc.StatusCode.OK
                except Exception as exc:  # noqa: BLE001
                    code = _code(exc)
                    fail(context, exc)
                finally:
                    finish(call, code, began)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, None, handler.response_serializer
            )

        if handler.stream_unary:
            inner_su = handler.stream_unary

            def stream_unary(request_iterator, context):
                began = time.monotonic()
                call, code = CallInfo(short), grpc.StatusCode.INTERNAL
                try:
                    call = start(context)
                    response = inner_su(map(decode, request_iterator), context)
                    code = grpc.StatusCode.OK
                    return response
                except Exception as exc:  # noqa: BLE001
                    code = _code(exc)
                    fail(context, exc)
                finally:
                    finish(call, code, began)

            return grpc.stream_unary_rpc_method_handler(
                stream_unary, None, handler.response_serializer
            )

        inner_ss = handler.stream_stream

        def stream_stream(request_iterator, context):
            began = time.monotonic()
            call, code = CallInfo(short), grpc.StatusCode.CANCELLED
            try:
                call = start(context)
                yield from inner_ss(map(decode, request_iterator), context)
                code = grpc.StatusCode.OK
            except Exception as exc:  # noqa: BLE001
                code = _code(exc)
                fail(context, exc)
            finally:
                finish(call, code, began)

        return grpc.stream_stream_rpc_method_handler(
            stream_stream, None, handler.response_serializer
        )


def _is_loopback(peer: str) -> bool:
    """``context.peer()`` is ``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``, ``unix:...``."""
    return peer_connections.is_local(peer)


def _code(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, grpc.RpcError):
        return grpc.StatusCode.CANCELLED
    return exc.code if isinstance(exc, ServeError) else grpc.StatusCode.INTERNAL
