#!/usr/bin/env python3
"""Container HEALTHCHECK: exit 0 when the daemon's grpc.health.v1 says SERVING.

Checks the overall server status ("") on the serving port from
AOTISERVE_PORT (default 8500). Kubernetes uses its native gRPC probes
instead; this is for `docker run`/`podman run` (image format docker).
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> int:
    port = os.environ.get("AOTISERVE_PORT", "8500")
    target = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=3
            )
    except grpc.RpcError as err:
        print(f"{target}: {err.code().name}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
