"""OIP CUDA shared memory on a GPU (issue 20): ResNet-50 fp32 batch 8 through the daemon with
its input and output in CUDA regions a colocated tritonclient registered
(``tritonclient.utils.cuda_shared_memory``), against ``run()`` in this process on a
container of the same package (bench.gpu's in-process figure: a host array in and out),
sequential calls, in one run. The request payload path (4.8 MB through gRPC) is printed
beside them.

Check: CUDA shared memory p50 <= in-process p50 + 0.5 ms.

    python -m bench.cuda_shared_memory [--n 200] [--batch 8] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from . import procs
from .gpu import _p, in_process


def _timed(fn, n: int) -> dict:
    for _ in range(max(10, n // 10)):
        fn()
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        lat.append((time.perf_counter() - t0) * 1e6)
    return {"p50_us": statistics.median(lat), "p99_us": _p(lat, 0.99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="sequential calls per way")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()

    import tritonclient.grpc as g
    import tritonclient.utils.cuda_shared_memory as cudashm

    from bench import resnet

    shape = [args.batch, 3, 224, 224]
    pkg, source = resnet.package("cuda", args.batch)
    results: dict = {"model": f"ResNet-50 ({source}) fp32", "input": shape}
    results["inproc"] = in_process(pkg, "cuda:0", shape, args.n, 1, 1.0, 1)["sequential"]

    server = procs.start_aotiserve(
        procs.tmpdir("cuda-shm-bench-"), {"resnet50": pkg}, extra_args=["--devices", "cuda:0"]
    )
    client = g.InferenceServerClient(server.target)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    out_bytes = args.batch * 1000 * 4
    cin = cudashm.create_shared_memory_region("rn_in", x.nbytes, 0)
    cout = cudashm.create_shared_memory_region("rn_out", out_bytes, 0)
    try:
        cudashm.set_shared_memory_region(cin, [x])
        client.register_cuda_shared_memory("rn_in", cudashm.get_raw_handle(cin), 0, x.nbytes)
        client.register_cuda_shared_memory("rn_out", cudashm.get_raw_handle(cout), 0, out_bytes)

        def shared():
            inp = g.InferInput("x", shape, "FP32")
            inp.set_shared_memory("rn_in", x.nbytes)
            out = g.InferRequestedOutput("output__0")
            out.set_shared_memory("rn_out", out_bytes)
            client.infer("resnet50", [inp], outputs=[out])

        def payload():
            inp = g.InferInput("x", shape, "FP32")
            inp.set_data_from_numpy(x)
            client.infer("resnet50", [inp]).as_numpy("output__0")

        # Both ways answer the same (the output region read back to the host).
        shared()
        got = cudashm.get_contents_as_numpy(cout, np.float32, [args.batch, 1000])
        inp = g.InferInput("x", shape, "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_allclose(
            got, client.infer("resnet50", [inp]).as_numpy("output__0"), rtol=1e-3, atol=1e-3
        )
        results["cuda_shm"] = _timed(shared, args.n)
        results["payload"] = _timed(payload, args.n)
    finally:
        try:
            client.unregister_cuda_shared_memory()
        finally:
            cudashm.destroy_shared_memory_region(cin)
            cudashm.destroy_shared_memory_region(cout)
            client.close()
            server.stop()
    margin = results["cuda_shm"]["p50_us"] - results["inproc"]["p50_us"]
    results["check"] = {"cuda_shm_minus_inproc_us": round(margin, 1), "ok": margin <= 500}
    print(f"{results['model']} batch {args.batch}, sequential p50 / p99 µs ({args.n} calls):")
    for key, label in (
        ("inproc", "in-process run()"),
        ("cuda_shm", "daemon, CUDA shared memory"),
        ("payload", "daemon, request payload"),
    ):
        r = results[key]
        print(f"  {label:28} {r['p50_us']:9.1f} {r['p99_us']:9.1f}")
    print(
        f"  CUDA shm p50 - in-process p50 = {margin:.1f} µs "
        f"(<= 500: {'yes' if margin <= 500 else 'no'})"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
