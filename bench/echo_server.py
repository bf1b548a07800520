"""The floor for any Python grpcio server: a bare unary echo with no work.

It answers every request with a fixed reply of the size a real response has,
through a generic handler with identity (bytes) serializers, so the figure is
grpcio's own per-call cost on this machine. Run as a script (it imports only
grpcio) and read the port from the ready file.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
from concurrent import futures

import grpc

METHOD = "/bench.Echo/Echo"


def serve(resp_size: int, workers: int, max_msg: int) -> tuple[grpc.Server, int]:
    reply = b"\x00" * resp_size

    def echo(request: bytes, context) -> bytes:
        return reply

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        options=[("grpc.max_receive_message_length", max_msg), ("grpc.max_send_message_length", max_msg)],
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--resp-size", type=int, required=True)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--max-msg", type=int, default=64 << 20)
    ap.add_argument("--ready-file", required=True)
    args = ap.parse_args()
    server, port = serve(args.resp_size, args.workers, args.max_msg)
    tmp = args.ready_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"port": port, "pid": os.getpid()}, f)
    os.replace(tmp, args.ready_file)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    server.stop(1).wait()


if __name__ == "__main__":
    main()
