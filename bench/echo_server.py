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


def serve_aio(resp_size: int, max_msg: int, ready_file: str) -> None:
    """The same echo on grpc.aio (one event loop thread, no thread pool)."""
    import asyncio

    reply = b"\x00" * resp_size

    async def echo(request: bytes, context) -> bytes:
        return reply

    async def run() -> None:
        handler = grpc.method_handlers_generic_handler(
            "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
        )
        server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", max_msg), ("grpc.max_send_message_length", max_msg)]
        )
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        _write_ready(ready_file, port)
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, done.set)
        loop.add_signal_handler(signal.SIGINT, done.set)
        await done.wait()
        await server.stop(1)

    asyncio.run(run())


def _write_ready(ready_file: str, port: int) -> None:
    tmp = ready_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"port": port, "pid": os.getpid()}, f)
    os.replace(tmp, ready_file)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--resp-size", type=int, required=True)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--max-msg", type=int, default=64 << 20)
    ap.add_argument("--ready-file", required=True)
    ap.add_argument("--aio", action="store_true", help="serve with grpc.aio instead of a thread pool")
    args = ap.parse_args()
    if args.aio:
        serve_aio(args.resp_size, args.max_msg, args.ready_file)
        return
    server, port = serve(args.resp_size, args.workers, args.max_msg)
    _write_ready(args.ready_file, port)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    server.stop(1).wait()


if __name__ == "__main__":
    main()
