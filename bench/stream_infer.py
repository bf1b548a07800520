"""OIP ModelStreamInfer against ModelInfer on the daemon's one port: the tiny ``mlp``
([1, 64] float32), one client (grpcio and the generated OIP classes, as the make bench
client), sequential calls: unary ModelInfer, then one stream carrying the same requests one
at a time (send one, read its answer). The port answers both in C++; the stream's messages
skip the per-call HTTP/2 stream setup and headers.

    python -m bench.stream_infer [--rounds 3] [--n 2000]
"""

from __future__ import annotations

import argparse
import queue
import statistics
import time

import numpy as np

from . import procs
from .common import packages, print_ways


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=2000, help="sequential requests per way, round")
    args = parser.parse_args()

    import grpc

    from aotiserve.oip import inference_pb2 as ipb
    from aotiserve.oip import inference_pb2_grpc

    server = procs.start_aotiserve(procs.tmpdir("stream-bench-"), packages(["mlp"]))
    channel = grpc.insecure_channel(server.target)
    stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
    x = np.random.default_rng(0).standard_normal((1, 64), dtype=np.float32)
    request = ipb.ModelInferRequest(
        model_name="mlp",
        inputs=[ipb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 64])],
        raw_input_contents=[x.tobytes()],
    )

    def unary(n: int) -> list[float]:
        lat = []
        for _ in range(n):
            t = time.perf_counter()
            stub.ModelInfer(request)
            lat.append(time.perf_counter() - t)
        return lat

    def streamed(n: int) -> list[float]:
        sent: queue.Queue = queue.Queue()
        answers = stub.ModelStreamInfer(iter(sent.get, None))
        lat = []
        for _ in range(n):
            t = time.perf_counter()
            sent.put(request)
            answer = next(answers)
            lat.append(time.perf_counter() - t)
            if answer.error_message:
                raise RuntimeError(answer.error_message)
        sent.put(None)
        for _ in answers:
            pass
        return lat

    ways = {"ModelInfer": unary, "ModelStreamInfer": streamed}
    p50: dict[str, list[float]] = {k: [] for k in ways}
    try:
        for fn in ways.values():
            fn(200)  # warm-up
        for _ in range(args.rounds):
            for name, fn in ways.items():
                p50[name].append(statistics.median(fn(args.n)) * 1e6)
    finally:
        channel.close()
        server.stop()
    print(f"tiny mlp, one client, sequential, p50 µs (median of {args.rounds} rounds x {args.n}):")
    print_ways(p50, "ModelInfer")


if __name__ == "__main__":
    main()
