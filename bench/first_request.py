"""First-request latency with and without warm-up (issue 18), against the steady p50.

For each setting a fresh in-process daemon serves the model on the device (a model of
tests/model_zoo.py, or ``resnet50``: bench/resnet.py's ResNet-50, fp32, batch 8);
the first Run after it turns SERVING is timed, then ``--runs`` more give the steady p50.
Each setting runs ``--rounds`` times (a fresh daemon each time). What the client pays
for its own first call is paid before the timed one, so the figure is the server's:
a ListModels connects the channel, and a Run naming a model the daemon does not serve
(NOT_FOUND, answered without touching the served model) builds the client's codecs for
RunRequest/RunResponse and grpcio's call path for the method.

On a GPU the warm-up setting is measured a second time with ``--no-gpu-slot-threads`` (every
run on the gRPC thread that took it), beside the default (every run of a slot on a thread of
its own, set up by the warm-up).

Where the time goes is read from the daemon's own statistics (OIP ModelStatistics) after the
first Run and after the steady ones: the server's whole time for the request, the wait for a
runner, the time in the runner (device copies included), decoding the inputs and encoding the
outputs — the first request's beside the steady mean, so a slow first request can be traced
to the runner (lazy device state), to the hot path around it, or to the transport.

    python -m bench.first_request [--device cuda:0] [--model mlp] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from .common import server_times, server_us_per_request

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

RESNET = "resnet50"  # bench/resnet.py's package (torchvision's network where importable)
RESNET_BATCH = 8
_SERVER_KEYS = ("server_first_us", "server_second_us", "server_steady_mean_us")


def _one(model: str, device: str, warmup_runs: int, runs: int, slot_threads: bool) -> dict:
    import grpc
    import wire
    from server_harness import running_server

    from aotiserve.v1 import model_runner_pb2 as pb

    inputs = _inputs(model)
    request = wire.run_request(model, inputs)
    with running_server(
        [],
        model_repository=str(_repository(model, device)),
        devices=(device,),
        warmup_runs=warmup_runs,
        runners_per_model=1,
        gpu_slot_threads=slot_threads,
    ) as srv:
        # The client's first-call costs, paid before the timed Run (see the module doc).
        srv.stub.ListModels(pb.ListModelsRequest())
        try:
            srv.stub.Run(wire.run_request(model + "-not-served", inputs))
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND, e
        pb.RunResponse.FromString(pb.RunResponse(outputs=request.inputs).SerializeToString())
        zero = server_times(srv.target, model)
        started = time.perf_counter()
        srv.stub.Run(request)
        first = time.perf_counter() - started
        after_first = server_times(srv.target, model)
        started = time.perf_counter()
        srv.stub.Run(request)
        second = time.perf_counter() - started
        after_second = server_times(srv.target, model)
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            srv.stub.Run(request)
            times.append(time.perf_counter() - started)
        after_steady = server_times(srv.target, model)
    return {
        "first": first,
        "second": second,
        "p50": statistics.median(times),
        "server_first_us": server_us_per_request(zero, after_first),
        "server_second_us": server_us_per_request(after_first, after_second),
        "server_steady_mean_us": server_us_per_request(after_second, after_steady),
    }


def _inputs(model: str):
    import torch

    if model == RESNET:
        torch.manual_seed(0)
        return (torch.randn(RESNET_BATCH, 3, 224, 224),)
    import model_zoo

    return model_zoo.MODELS[model].inputs(4)


def _repository(model: str, device: str) -> Path:
    import tempfile

    kind = device.split(":")[0]
    if model == RESNET:
        from bench import resnet

        package = resnet.package(kind, RESNET_BATCH)[0]
    else:
        import model_zoo

        package = model_zoo.compiled(model, kind)
    folder = Path(tempfile.mkdtemp(prefix="aotiserve-first-"))
    (folder / f"{model}.pt2").symlink_to(package)
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument(
        "--model", default="mlp", help=f"a model of tests/model_zoo.py, or {RESNET} (fp32, batch 8)"
    )
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--warmup-runs",
        default="0,1",
        help="comma-separated warm-up run counts to measure, each a setting (default 0,1)",
    )
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args(argv)
    results = {}
    settings = [(int(n), True) for n in args.warmup_runs.split(",")]
    if args.device.startswith("cuda"):
        settings.append((1, False))  # --no-gpu-slot-threads, beside the default
    for warmup, slot_threads in settings:
        rounds = [
            _one(args.model, args.device, warmup, args.runs, slot_threads)
            for _ in range(args.rounds)
        ]
        label = f"warmup_runs={warmup}" + ("" if slot_threads else " no_gpu_slot_threads")
        results[label] = {
            "first_ms": [round(r["first"] * 1e3, 3) for r in rounds],
            "second_ms": [round(r["second"] * 1e3, 3) for r in rounds],
            "steady_p50_ms": [round(r["p50"] * 1e3, 3) for r in rounds],
            "first_over_p50": [round(r["first"] / r["p50"], 2) for r in rounds],
            **{key: [r[key] for r in rounds] for key in _SERVER_KEYS},
        }
        print(f"{label}: " + json.dumps(results[label]), flush=True)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"device": args.device, "model": args.model, **results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
