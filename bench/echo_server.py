"""The floor for any Python grpcio server: a bare unary echo with no work.

It answers every request to ``/bench.Echo/Echo`` with a fixed reply (the bytes of
``--reply-file``, e.g. a serialized RunResponse, or ``--resp-size`` zero bytes)
through a generic handler with identity (bytes) serializers, so the figure is
grpcio's own per-call cost on this machine. bench/echo_server.cc is the same echo
in gRPC C++. Run as a script (it imports only grpcio) and read the port from the
ready file.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
from concurrent import futures

import grpc


def serve(reply: bytes, workers: int, max_msg: int) -> tuple[grpc.Server, int]:
    def echo(request: bytes, context) -> bytes:
        return reply

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        options=[
            ("grpc.max_receive_message_length", max_msg),
            ("grpc.max_send_message_length", max_msg),
        ],
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def _write_ready(ready_file: str, port: int) -> None:
    tmp = ready_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"port": port, "pid": os.getpid()}, f)
    os.replace(tmp, ready_file)


def main() -> None:
    ap = argparse.ArgumentParser()
    payload = ap.add_mutually_exclusive_group(required=True)
    payload.add_argument("--reply-file", help="answer every call with this file's bytes")
    payload.add_argument(
        "--resp-size", type=int, help="answer every call with this many zero bytes"
    )
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--max-msg", type=int, default=64 << 20)
    ap.add_argument("--ready-file", required=True)
    args = ap.parse_args()
    if args.reply_file:
        with open(args.reply_file, "rb") as f:
            reply = f.read()
    else:
        reply = b"\x00" * args.resp_size
    server, port = serve(reply, args.workers, args.max_msg)
    _write_ready(args.ready_file, port)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    server.stop(1).wait()


if __name__ == "__main__":
    main()
