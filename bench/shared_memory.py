"""OIP system shared memory against the request payload: one colocated tritonclient sends
64 MiB in and gets 64 MiB out (the zoo's ``passthrough``, [16384, 1024] float32) through
``raw_input_contents``/``raw_output_contents``, and through two registered regions.

Three ways, interleaved over rounds, medians of each round's p50 printed with the ratio:
  payload     InferInput.set_data_from_numpy, result.as_numpy
  shm         the input already in its region (written there by its producer), the
              output read in place (tritonclient's utils.shared_memory flow)
  shm+copies  as shm, plus the client's copy of its array into the region and of the
              output out of it (a client whose data lives in its own arrays)

    python -m bench.shared_memory [--rounds 3] [--n 10] [--rows 16384]
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

import numpy as np

from . import procs
from .common import packages, print_ways


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=10, help="sequential calls per way and round")
    parser.add_argument("--rows", type=int, default=16384, help="rows of 1024 float32")
    args = parser.parse_args()

    import tritonclient.grpc as g
    import tritonclient.utils.shared_memory as shm

    server = procs.start_aotiserve(procs.tmpdir("shm-bench-"), packages(["passthrough"]))
    client = g.InferenceServerClient(server.target)
    x = np.random.default_rng(0).standard_normal((args.rows, 1024), dtype=np.float32)
    nbytes = x.nbytes
    suffix = uuid.uuid4().hex[:8]
    handles = [
        shm.create_shared_memory_region(name, f"/aotiserve-bench-{name}-{suffix}", nbytes)
        for name in ("bench_in", "bench_out")
    ]
    try:
        for name in ("bench_in", "bench_out"):
            client.register_system_shared_memory(name, f"/aotiserve-bench-{name}-{suffix}", nbytes)
        shm.set_shared_memory_region(handles[0], [x])

        def payload():
            inp = g.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            return client.infer("passthrough", [inp]).as_numpy("output__0")

        def shared(copies: bool):
            if copies:
                shm.set_shared_memory_region(handles[0], [x])
            inp = g.InferInput("x", list(x.shape), "FP32")
            inp.set_shared_memory("bench_in", nbytes)
            out = g.InferRequestedOutput("output__0")
            out.set_shared_memory("bench_out", nbytes)
            result = client.infer("passthrough", [inp], outputs=[out])
            shape = list(result.get_output("output__0").shape)
            y = shm.get_contents_as_numpy(handles[1], np.float32, shape)
            return np.array(y) if copies else y

        ways = {
            "payload": payload,
            "shm": lambda: shared(False),
            "shm+copies": lambda: shared(True),
        }
        for fn in ways.values():  # warm-up, and every way returns x
            np.testing.assert_array_equal(fn(), x)
        p50: dict[str, list[float]] = {k: [] for k in ways}
        for _ in range(args.rounds):
            for name, fn in ways.items():
                times = []
                for _ in range(args.n):
                    t = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t)
                p50[name].append(statistics.median(times) * 1e3)
    finally:
        try:
            client.unregister_system_shared_memory()
        finally:
            for h in handles:
                shm.destroy_shared_memory_region(h)
            client.close()
            server.stop()
    mib = nbytes / 2**20
    print(
        f"{mib:.0f} MiB in + {mib:.0f} MiB out, tritonclient, p50 ms (median of "
        f"{args.rounds} rounds x {args.n} calls):"
    )
    print_ways(p50, "payload", digits=2)


if __name__ == "__main__":
    main()
