"""``grpc.health.v1.Health``: grpc_health's servicer, limited to the names this daemon serves.

grpc_health's own servicer answers a Watch of any name with SERVICE_UNKNOWN and
keeps the stream, and the name, for good (every name ever watched stays in
memory, however long), and does not implement List. Here:

- ``Check`` and ``Watch`` of a name the daemon does not serve: NOT_FOUND at once,
  nothing kept; a served name's watchers are forgotten with their last stream;
- ``List``: the status of every served name.

The served names are those the daemon set a status for ("" and its services).
"""

from __future__ import annotations

from grpc_health.v1 import health, health_pb2

from .errors import NotFound

SERVICE_NAME = health.SERVICE_NAME
_SHOWN = 64  # characters of an unknown name quoted back in the error


def _unknown(service: str) -> NotFound:
    shown = service[:_SHOWN] + ("..." if len(service) > _SHOWN else "")
    return NotFound(f"health: this server serves no service named {shown!r}")


class HealthServicer(health.HealthServicer):
    """grpc_health's servicer (``set``, ``enter_graceful_shutdown`` as there)."""

    def Check(self, request, context):
        with self._lock:
            status = self._server_status.get(request.service)
        if status is None:
            raise _unknown(request.service)
        return health_pb2.HealthCheckResponse(status=status)

    def Watch(self, request, context, send_response_callback=None):
        with self._lock:
            if request.service not in self._server_status:
                raise _unknown(request.service)
            return super().Watch(request, context, send_response_callback)

    def List(self, request, context):
        with self._lock:
            statuses = dict(self._server_status)
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in statuses.items()
            }
        )

    def _on_close_callback(self, send_response_callback, service):
        def callback():
            with self._lock:
                callbacks = self._send_response_callbacks.get(service)
                if callbacks is not None:
                    callbacks.discard(send_response_callback)
                    if not callbacks:
                        del self._send_response_callbacks[service]
            send_response_callback(None)

        return callback

    def watched(self) -> int:
        """How many service names have watchers now (each served, each with a stream)."""
        with self._lock:
            return len(self._send_response_callbacks)
