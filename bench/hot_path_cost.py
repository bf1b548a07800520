"""Where a tiny Run's time goes, against the gRPC C++ echo floor (issue 16's p50 ratio).

One daemon serving the zoo's ``mlp`` and the C++ echo floor (bench/echo_server.cc) answering
the very bytes the daemon answers; one client (this process, grpcio and the generated protobuf
classes, as ``make bench``). Sequential calls in blocks of ``--block``, echo and Run taking
turns block by block for ``--blocks`` each, so both see the same machine: a VM's speed drifts
over seconds, more than the difference measured. Both servers run on the first cores, the
client on the last (as ``make bench`` measures the tiny p50); with one core they share it.

Printed: both p50s over every call, their ratio and the median of the per-block-pair ratios,
the model's own run in this process (``runner.run``, hot), and the daemon's own account of a
Run (OIP ModelStatistics over the same calls: its whole time in the port, the run, decoding
and encoding) beside what lies outside it (Run p50 − echo p50 − the port's time: gRPC's work
for what the echo does not have, such as the weights-version trailer, and the client's).

    python -m bench.hot_path_cost [--device cuda:0] [--blocks 40] [--block 100] [--json OUT]

``--device cuda:N``: the zoo's ``mlp`` compiled for CUDA, served on that GPU (the in-process run
copies its input to the device and its output back, as the daemon does).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from . import driver, procs
from .common import (
    TINY_OUT,
    TINY_SHAPES,
    machine_info,
    packages,
    run_reply,
    server_times,
    server_us_per_request,
)
from .gpu import inproc_call


def _p50(values: list[float]) -> float:
    return statistics.median(values)


def measure(device: str, blocks: int, block: int, warmup: int) -> dict:
    cuda = device.startswith("cuda")
    pkg = packages(["mlp"], device="cuda" if cuda else "cpu")["mlp"]
    work = procs.tmpdir("hot-path-cost-")
    daemon = procs.start_aotiserve(
        work / "aotiserve",
        {"mlp": pkg},
        env={"OMP_NUM_THREADS": "1"},
        extra_args=["--devices", device] if cuda else None,
    )
    try:
        reply = run_reply(daemon.target, "mlp", TINY_SHAPES, TINY_OUT)
        echo = procs.start_echo(work / "echo_cpp", reply, cpp=True)
    except Exception:
        daemon.stop()
        raise
    servers = {"echo_cpp": echo, "run": daemon}
    base = {"model": "mlp", "input_shapes": TINY_SHAPES}
    inproc, model = inproc_call(pkg, device, TINY_SHAPES[0], 1)
    calls = {
        "echo_cpp": driver.make_call(base | {"kind": "echo", "target": echo.target}),
        "run": driver.make_call(base | {"kind": "run", "target": daemon.target}),
        "inproc": inproc,
    }
    cpus = sorted(os.sched_getaffinity(0))
    split = len(cpus) >= 2
    try:
        if split:
            for s in servers.values():
                driver.set_affinity(procs.process_tree(s.pid), set(cpus[:-1]))
            driver.set_affinity([os.getpid()], {cpus[-1]})
        for call in calls.values():
            for _ in range(warmup):
                call()
        before = server_times(daemon.target, "mlp")
        lat: dict[str, list[float]] = {k: [] for k in calls}
        pairs: list[float] = []
        clock = time.perf_counter_ns
        for b in range(blocks):
            # Alternate which goes first, so neither always follows the other.
            order = ("echo_cpp", "run", "inproc") if b % 2 == 0 else ("run", "echo_cpp", "inproc")
            block_p50 = {}
            for key in order:
                call = calls[key]
                for _ in range(5):  # back on this system's code and data
                    call()
                mine = []
                for _ in range(block):
                    t0 = clock()
                    call()
                    mine.append((clock() - t0) / 1e3)
                lat[key] += mine
                block_p50[key] = _p50(mine)
            pairs.append(block_p50["run"] / block_p50["echo_cpp"])
        port = server_us_per_request(before, server_times(daemon.target, "mlp"))
    finally:
        if split:
            driver.set_affinity([os.getpid()], set(cpus))
        for s in servers.values():
            s.stop()
        model.close()
    p50 = {k: round(_p50(v), 1) for k, v in lat.items()}
    gap = p50["run"] - p50["echo_cpp"]
    return {
        "machine": machine_info(),
        "settings": {
            "device": device,
            "blocks": blocks,
            "block": block,
            "warmup": warmup,
            "split_cores": split,
        },
        "p50_us": p50,
        "run_over_echo_cpp": round(p50["run"] / p50["echo_cpp"], 3),
        "run_over_echo_cpp_block_median": round(_p50(pairs), 3),
        "run_minus_echo_cpp_us": round(gap, 1),
        "port_us": port,  # the daemon's mean per Run: success = its whole time in the port
        "outside_port_us": round(gap - port.get("success", 0.0), 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda:N")
    ap.add_argument("--blocks", type=int, default=40, help="blocks per system")
    ap.add_argument("--block", type=int, default=100, help="sequential calls per block")
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args(argv)
    out = measure(args.device, args.blocks, args.block, args.warmup)
    p, port = out["p50_us"], out["port_us"]
    print(
        f"tiny mlp on {args.device}, {args.blocks} blocks of {args.block} sequential calls "
        "each, taking turns:"
    )
    print(
        f"  p50 µs: gRPC C++ echo {p['echo_cpp']}, aotiserve Run {p['run']}, "
        f"in-process run {p['inproc']}"
    )
    print(
        f"  Run ÷ echo: {out['run_over_echo_cpp']} (median of block pairs "
        f"{out['run_over_echo_cpp_block_median']}); Run − echo {out['run_minus_echo_cpp_us']} µs"
    )
    print(
        f"  the port's own time per Run (mean, µs): {port.get('success')} — run "
        f"{port.get('compute_infer')}, decode {port.get('compute_input')}, encode "
        f"{port.get('compute_output')}, queue {port.get('queue')}"
    )
    print(f"  outside the port: {out['outside_port_us']} µs")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
