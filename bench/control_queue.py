"""What a control-RPC service beside the hot path costs it (runner_ext/csrc/control_queue.h).

The gRPC C++ echo floor (bench/echo_server.cc) answers the tiny Run's bytes, alone or with an
idle generic service registered beside it, as the daemon could serve its control RPCs: gRPC's
callback API, or the async API on a non-listening completion queue drained by one or two
threads. No control call is made: only the echo's p50 (the bench's one client, sequential calls)
is measured, the variants interleaved over rounds, medians printed.

    python -m bench.control_queue [--rounds 5] [--n 3000]
"""

from __future__ import annotations

import argparse
import statistics

from . import procs
from .common import TINY_OUT, TINY_SHAPES, run_reply
from .driver import run

VARIANTS = {
    "echo alone": [],
    "+ callback service": ["--control", "callback"],
    "+ async service, 1 thread": ["--control", "async", "--control-threads", "1"],
    "+ async service, 2 threads": ["--control", "async", "--control-threads", "2"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=3000, help="sequential calls per variant, round")
    args = parser.parse_args()
    reply = run_reply(None, "mlp", TINY_SHAPES, TINY_OUT)
    work = procs.tmpdir("control-queue-")
    p50: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        for name, extra in VARIANTS.items():
            server = procs.start_echo(
                work / f"{r}-{len(p50[name])}-{abs(hash(name))}", reply, cpp=True, extra_args=extra
            )
            try:
                cfg = {
                    "kind": "echo",
                    "target": server.target,
                    "model": "mlp",
                    "input_shapes": TINY_SHAPES,
                    "seq_n": args.n,
                    "warmup": 200,
                }
                p50[name].append(run(cfg)["sequential"]["p50_us"])
            finally:
                server.stop()
    base = statistics.median(p50["echo alone"])
    print(f"gRPC C++ echo, tiny Run bytes, p50 µs (median of {args.rounds} rounds):")
    for name, values in p50.items():
        med = statistics.median(values)
        print(f"  {name:28} {med:7.1f}  ({med - base:+6.1f})  rounds {[round(v) for v in values]}")


if __name__ == "__main__":
    main()
