"""Where a tiny Run's time goes, against the gRPC C++ echo floor (issue 16's p50 ratio).

One daemon serving the zoo's ``mlp``, the C++ echo floor (bench/echo_server.cc) answering the
very bytes the daemon answers, and the same echo adding the daemon's
``aotiserve-weights-version`` trailer to each reply; one client (this process, grpcio and the
generated protobuf classes, as ``make bench``). Sequential calls in blocks of ``--block``, the
systems taking turns block by block for ``--blocks`` each, so all see the same machine: a VM's
speed drifts over seconds, more than the differences measured. The servers run on the first
cores, the client on the last (as ``make bench`` measures the tiny p50); with one core they
share it.

Printed: the p50s over every call, Run ÷ echo and the median of the per-block-pair ratios, the
model's own run in this process (hot), and Run − echo split into what the trailer costs gRPC
and the client (echo with it − echo), the daemon's own account of a Run (OIP ModelStatistics
over the same calls: its whole time in the port, the run, decoding and encoding), and the rest
(gRPC's and the client's other work that the echo does not have, in a process that also holds
torch and the model).

    python -m bench.hot_path_cost [--device cuda:0] [--blocks 40] [--block 100] [--json OUT]

``--device cuda:N``: the zoo's ``mlp`` compiled for CUDA, served on that GPU (the in-process run
copies its input to the device and its output back, as the daemon does).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from aotiserve.client.channel import WEIGHTS_VERSION_TRAILER

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


def _trailer(reply: bytes) -> str:
    """The weights-version trailer the daemon sends with ``reply``, as KEY=VALUE."""
    from aotiserve.v1 import model_runner_pb2 as pb

    return f"{WEIGHTS_VERSION_TRAILER}={pb.RunResponse.FromString(reply).weights_version}"


def measure(device: str, blocks: int, block: int, warmup: int) -> dict:
    cuda = device.startswith("cuda")
    pkg = packages(["mlp"], device="cuda" if cuda else "cpu")["mlp"]
    work = procs.tmpdir("hot-path-cost-")
    servers = {
        "run": procs.start_aotiserve(
            work / "aotiserve",
            {"mlp": pkg},
            env={"OMP_NUM_THREADS": "1"},
            extra_args=["--devices", device] if cuda else None,
        )
    }
    try:
        reply = run_reply(servers["run"].target, "mlp", TINY_SHAPES, TINY_OUT)
        for key, extra in (("echo_cpp", []), ("echo_cpp_trailer", ["--trailer", _trailer(reply)])):
            servers[key] = procs.start_echo(work / key, reply, cpp=True, extra_args=extra)
        inproc, model = inproc_call(pkg, device, TINY_SHAPES[0], 1)
    except Exception:
        for s in servers.values():
            s.stop()
        raise
    base = {"model": "mlp", "input_shapes": TINY_SHAPES}
    calls = {
        key: driver.make_call(
            base | {"kind": "run" if key == "run" else "echo", "target": s.target}
        )
        for key, s in servers.items()
    }
    calls["inproc"] = inproc
    pids = [p for s in servers.values() for p in procs.process_tree(s.pid)]
    try:
        with driver.split_cores(pids) as split:
            for call in calls.values():
                for _ in range(warmup):
                    call()
            before = server_times(servers["run"].target, "mlp")
            lat, blocks_p50 = driver.take_turns(calls, blocks * block, block)
            port = server_us_per_request(before, server_times(servers["run"].target, "mlp"))
    finally:
        for s in servers.values():
            s.stop()
        model.close()
    p50 = {k: round(statistics.median(v), 1) for k, v in lat.items()}
    pairs = [b["run"] / b["echo_cpp"] for b in blocks_p50]
    gap = p50["run"] - p50["echo_cpp"]
    trailer = p50["echo_cpp_trailer"] - p50["echo_cpp"]
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
        "run_over_echo_cpp_block_median": round(statistics.median(pairs), 3),
        "run_minus_echo_cpp_us": round(gap, 1),
        "trailer_us": round(trailer, 1),  # the same echo with the daemon's trailer, minus it
        "port_us": port,  # the daemon's mean per Run: success = its whole time in the port
        "rest_us": round(gap - trailer - port.get("success", 0.0), 1),
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
        f"  p50 µs: gRPC C++ echo {p['echo_cpp']}, the echo with the weights-version trailer "
        f"{p['echo_cpp_trailer']}, aotiserve Run {p['run']}, in-process run {p['inproc']}"
    )
    print(
        f"  Run ÷ echo: {out['run_over_echo_cpp']} (median of block pairs "
        f"{out['run_over_echo_cpp_block_median']}); Run − echo {out['run_minus_echo_cpp_us']} µs:"
    )
    print(f"    the trailer (echo with it − echo): {out['trailer_us']} µs")
    print(
        f"    the port's own time per Run (mean): {port.get('success')} µs — run "
        f"{port.get('compute_infer')}, decode {port.get('compute_input')}, encode "
        f"{port.get('compute_output')}, queue {port.get('queue')}"
    )
    print(f"    the rest: {out['rest_us']} µs")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
