"""The standard ``grpc.health.v1.Health`` service, without grpcio-health-checking.

Why hand-rolled: the light client must not require grpcio-health-checking,
and using its stubs only when installed would give two code paths, the
untested one being what torch-free users run. The two messages involved are
one field each and frozen by grpc's health-checking spec
(``HealthCheckRequest{string service = 1}``,
``HealthCheckResponse{ServingStatus status = 1}``), so a dozen lines of wire
format are the smaller dependency. It also keeps these names out of the
protobuf descriptor pool, where grpc_health registers them in servers.
"""

from __future__ import annotations

from aotiserve.client.wire import read_varint

CHECK = "/grpc.health.v1.Health/Check"
WATCH = "/grpc.health.v1.Health/Watch"

#: grpc.health.v1.HealthCheckResponse.ServingStatus, by value.
STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def encode_request(service: str) -> bytes:
    """A serialized ``HealthCheckRequest`` for ``service`` ("" is the whole server)."""
    raw = service.encode()
    size, n = bytearray(), len(raw)
    while n > 0x7F:
        size.append((n & 0x7F) | 0x80)
        n >>= 7
    size.append(n)
    return b"\x0a" + bytes(size) + raw if raw else b""


_read_varint = read_varint


def decode_response(data: bytes) -> str:
    """The status name in a serialized ``HealthCheckResponse``."""
    status, pos = 0, 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _read_varint(data, pos)
            if field == 1:
                status = value
        elif wire_type == 2:
            size, pos = _read_varint(data, pos)
            pos += size
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            raise ValueError(f"unexpected wire type {wire_type} in health response")
    return STATUS_NAMES.get(status, f"UNKNOWN({status})")


def _identity(data: bytes) -> bytes:
    return data


def stubs(channel):
    """(check, watch) multicallables on a grpc or grpc.aio channel."""
    check = channel.unary_unary(
        CHECK, request_serializer=_identity, response_deserializer=decode_response
    )
    watch = channel.unary_stream(
        WATCH, request_serializer=_identity, response_deserializer=decode_response
    )
    return check, watch
