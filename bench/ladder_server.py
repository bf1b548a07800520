"""The echo floor with aotiserve's per-request work added back one layer at a time.

Each ``--layers`` value is cumulative, in this order, so the bench can tell
what each layer costs per call (CPU µs and latency) on this machine:

- ``bare``: the echo floor (generic handler, fixed reply).
- ``interceptor``: a pass-through ``grpc.ServerInterceptor`` that wraps the
  handler per call, as aotiserve's ``ServingInterceptor`` does.
- ``torch``: ``import torch`` in the server process, nothing else (does a
  loaded torch slow grpcio's own work?).
- ``proto``: RunRequest parsed with the generated code, the input decoded
  with aotiserve's ``tensor_codec.decode``, a RunResponse built with
  ``tensor_codec.encode`` and serialized (the model is not run: the input is
  echoed as the output).
- ``fastcodec``: instead of ``proto``, the hand-written RunRequest parser and
  RunResponse writer the daemon registers for Run (``server/run_wire.py``; no generated-code
  objects on the Run path).
- ``model``: the tiny model actually runs (``runner_ext``, 2 runners, GIL
  released during ``run``).
- ``model_gil``: instead of ``model``, torch's own loader
  (``torch._inductor.aoti_load_package``), which holds the GIL for the whole
  call: tells what releasing the GIL costs for a model this small.
- ``trailer``: the weights version also sent as trailing metadata.
- ``metrics``: the Prometheus updates aotiserve makes per Run (labels()
  lookups on counters, gauges and histograms).

Not part of the daemon: a measuring instrument for ``bench/run_all.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from concurrent import futures

import grpc

if __package__ in (None, ""):  # run as a script: make `bench` importable for the fastcodec layer
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LAYERS = ("bare", "interceptor", "torch", "proto", "fastcodec", "model", "model_gil", "trailer", "metrics")


class PassThrough(grpc.ServerInterceptor):
    """Wraps each call's behaviour in a closure, the shape of a real interceptor."""

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        def behaviour(request, context):
            return inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            behaviour, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


def build(layers: set[str], package: str | None, resp_size: int):
    deserialize = serialize = None
    if "torch" in layers:
        import torch  # noqa: F401
    if "fastcodec" in layers:
        return _build_fast(layers, package)
    if "proto" not in layers:
        reply = b"\x00" * resp_size

        def run(request, context):
            return reply

        return run, deserialize, serialize

    from aotiserve.server import tensor_codec as codec
    from aotiserve.v1 import model_runner_pb2 as pb

    deserialize, serialize = pb.RunRequest.FromString, pb.RunResponse.SerializeToString
    runner = None
    if "model_gil" in layers:
        import torch

        compiled = torch._inductor.aoti_load_package(package)
        runner = compiled.loader  # torch's AOTIModelPackageLoader: run(list) holds the GIL
    elif "model" in layers:
        from aotiserve.runner_ext import load_model

        runner = load_model(package, num_runners=2).runner
    metrics = None
    if "metrics" in layers:
        from aotiserve.server.metrics import Metrics

        metrics = Metrics()

    def run(request, context):
        began = time.monotonic()
        if metrics:
            metrics.in_flight.labels("Run").inc()
        inputs = [codec.decode(t, f"input {i}") for i, t in enumerate(request.inputs)]
        outputs = runner.run(inputs) if runner else inputs
        if "trailer" in layers:
            context.set_trailing_metadata((("aotiserve-weights-version", "initial"),))
        if metrics:
            computed = time.monotonic() - began
            metrics.queue_seconds.labels(request.model, "cpu").observe(0.0)
            metrics.compute_seconds.labels(request.model, "cpu").observe(computed)
            metrics.device_requests.labels(request.model, "cpu").inc()
            metrics.in_flight.labels("Run").dec()
            metrics.requests.labels(request.model, "Run", "OK").inc()
            metrics.request_seconds.labels(request.model, "Run").observe(time.monotonic() - began)
        return pb.RunResponse(outputs=[codec.encode(t) for t in outputs], weights_version="initial")

    return run, deserialize, serialize


def _build_fast(layers: set[str], package: str | None):
    from aotiserve.server import run_wire
    from aotiserve.server import tensor_codec as codec

    runner = None
    if "model" in layers:
        from aotiserve.runner_ext import load_model

        runner = load_model(package, num_runners=2).runner

    def run(request, context) -> bytes:
        inputs = [codec.decode(t, f"input {i}") for i, t in enumerate(request.inputs)]
        outputs = runner.run(inputs) if runner else inputs
        if "trailer" in layers:
            context.set_trailing_metadata((("aotiserve-weights-version", "initial"),))
        return run_wire.write_run_response(outputs, [codec.wire_dtype(t.dtype) for t in outputs],
                                           "initial")

    return run, run_wire.parse_run_request, run_wire.identity


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", required=True, help=f"comma list, cumulative: {', '.join(LAYERS)}")
    ap.add_argument("--package", help="the tiny model's .pt2 (for the model layer)")
    ap.add_argument("--resp-size", type=int, default=59)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--ready-file", required=True)
    args = ap.parse_args()
    layers = set(args.layers.split(","))
    run, deserialize, serialize = build(layers, args.package, args.resp_size)
    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Echo": grpc.unary_unary_rpc_method_handler(run, request_deserializer=deserialize,
                                                     response_serializer=serialize)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers),
                         interceptors=[PassThrough()] if "interceptor" in layers else None)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
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
