"""The Python side of the port's bridge: a bounded pool of threads that answer every RPC
the C++ port does not (control RPCs, weights, metadata, reflection, Run for models it
hands over, e.g. with dynamic batching).

Each thread takes the next call from the port (``PortServer.next_item``, without the
GIL), finds its handler among the servicers' — wrapped by the one interceptor, so
errors become status codes and metrics are recorded as for every call — and drives it:
a request is read from the port only when the handler asks for the next one, and a
response is written only once gRPC took the previous one (back-pressure both ways).
The handlers see a :class:`BridgeContext`, the part of ``grpc.ServicerContext`` they use.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc

from aotiserve import runner_ext

log = logging.getLogger(__name__)

_HandlerCallDetails = collections.namedtuple(
    "_HandlerCallDetails", ("method", "invocation_metadata")
)


class _Abort(Exception):
    """``context.abort``: ends the call with this status."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code
        self.details = details


class BridgeContext:
    """What a servicer sees of its call (the subset of ``grpc.ServicerContext`` used)."""

    def __init__(self, call: runner_ext.BridgeCall):
        self._call = call
        self._trailers: tuple = ()
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._ended = False
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def invocation_metadata(self) -> tuple:
        return self._call.metadata

    def peer(self) -> str:
        return self._call.peer

    def time_remaining(self) -> float | None:
        return self._call.time_remaining()

    def is_active(self) -> bool:
        return self._call.is_active()

    def add_callback(self, callback: Callable[[], None]) -> bool:
        """Runs ``callback`` when the call is cancelled or ends."""
        with self._lock:
            if self._ended:
                return False
            self._callbacks.append(callback)
        return True

    def set_trailing_metadata(self, metadata) -> None:
        self._trailers = tuple(metadata)

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def abort(self, code: grpc.StatusCode, details: str):
        raise _Abort(code, details)

    def send_initial_metadata(self, _metadata) -> None:
        pass  # initial metadata goes with the first message

    def end(self) -> None:
        """Runs the callbacks once (cancelled or finished)."""
        with self._lock:
            if self._ended:
                return
            self._ended = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # noqa: BLE001 (a callback must not take the thread down)
                log.exception("call callback failed")


class _Collector:
    """Stands in for a grpc.Server while the servicers add their handlers."""

    def __init__(self):
        self.generic: list[Any] = []

    def add_generic_rpc_handlers(self, handlers) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.generic.append(grpc.method_handlers_generic_handler(service, handlers))


def collect_handlers(adders: Sequence[Callable[[Any], None]]) -> list[Any]:
    """The generic handlers the ``adders`` (``add_XServicer_to_server`` and the like)
    register on a server."""
    collector = _Collector()
    for add in adders:
        add(collector)
    return collector.generic


def streaming_methods(handlers: Sequence[Any]) -> list[str]:
    """The methods among ``handlers`` that stream (the port limits them as long-lived)."""
    out = []
    for generic in handlers:
        for method, handler in getattr(generic, "_method_handlers", {}).items():
            if not handler.unary_unary:
                out.append(method if method.startswith("/") else f"/{method}")
    return out


class Bridge:
    """``workers`` threads answering the port's bridged calls with ``handlers``."""

    def __init__(
        self, port: runner_ext.PortServer, handlers: Sequence[Any], interceptor, workers: int
    ):
        self._port = port
        self._generic = list(handlers)
        self._interceptor = interceptor
        self._contexts: dict[int, BridgeContext] = {}
        self._threads = [
            threading.Thread(target=self._loop, name=f"aotiserve-bridge-{i}", daemon=True)
            for i in range(workers)
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def join(self, timeout: float) -> None:
        for t in self._threads:
            t.join(timeout)

    def _find(self, method: str, metadata: tuple = ()):
        details = _HandlerCallDetails(method, metadata)
        for generic in self._generic:
            handler = generic.service(details)
            if handler is not None:
                return handler
        return None

    def _loop(self) -> None:
        port = self._port
        while True:
            item = port.next_item()
            if item is None:
                return
            if isinstance(item, int):
                ctx = self._contexts.get(item)
                if ctx is not None:
                    ctx.end()
                continue
            try:
                self._handle(item)
            except Exception:  # noqa: BLE001 (the thread keeps serving)
                log.exception("bridge: %s failed", item.method)

    def _handle(self, call: runner_ext.BridgeCall) -> None:
        method = call.method
        details = _HandlerCallDetails(method, call.metadata)
        handler = self._interceptor.intercept_for(
            lambda d: self._find(d.method, d.invocation_metadata), details, call.admin_rpcs
        )
        if handler is None:
            call.finish(grpc.StatusCode.UNIMPLEMENTED.value[0], f"Method not found: {method}", [])
            return
        ctx = BridgeContext(call)
        self._contexts[call.id] = ctx
        code, message = grpc.StatusCode.OK, ""
        try:
            self._drive(call, handler, ctx)
            if ctx.code is not None:
                code, message = ctx.code, ctx.details
        except _Abort as abort:
            code, message = abort.code, abort.details
        except Exception:  # noqa: BLE001 (the interceptor maps servicer errors; this is ours)
            log.exception("bridge: %s failed", method)
            code, message = grpc.StatusCode.INTERNAL, "internal error"
        finally:
            self._contexts.pop(call.id, None)
            call.finish(code.value[0], message, [(k, str(v)) for k, v in ctx._trailers])
            ctx.end()

    @staticmethod
    def _drive(call: runner_ext.BridgeCall, handler, ctx: BridgeContext) -> None:
        serialize = handler.response_serializer or (lambda r: r)
        if handler.request_streaming:
            request: Any = _requests(call)
        else:
            request = call.read()
            if request is None:
                raise _Abort(grpc.StatusCode.INTERNAL, "the call ended before its request arrived")
        if handler.unary_unary or handler.stream_unary:
            fn = handler.unary_unary or handler.stream_unary
            response = fn(request, ctx)
            if response is not None:
                call.write(serialize(response))
            return
        fn = handler.unary_stream or handler.stream_stream
        responses = fn(request, ctx)
        try:
            for response in responses:
                if not call.write(serialize(response)):
                    return  # the client went away
        finally:
            close = getattr(responses, "close", None)
            if close is not None:
                close()


class CallEnded(grpc.RpcError):
    """The client cancelled, or the call ended, while the handler read its requests
    (as grpcio's request iterator raises)."""


def _requests(call: runner_ext.BridgeCall) -> Iterator[bytes]:
    while True:
        message = call.read()
        if message is None:
            if not call.is_active():
                raise CallEnded(f"{call.method}: the call ended before its last request")
            return
        yield message
