"""Would grpc.aio make aotiserve's Run faster? The Run path on a grpc.aio server, layer by layer.

    python -m bench.aio_ladder [--variants "none;metrics,trailer,plane;..."] [--rounds 3]

Each variant is a grpc.aio server (one event loop thread; the handler runs on the
loop, no thread hop) serving the native Run of the tiny MLP with aotiserve's own
data plane, codec and metrics, minus the layers named in the variant:

- ``none``: the whole Run path (no interceptor: no auth, no per-call bookkeeping);
- ``metrics``: without the per-request Prometheus updates;
- ``trailer``: without the weights-version trailer;
- ``plane``: the runner called directly instead of ``DataPlane.run`` (no admission,
  no lock, no per-device metrics);
- ``model``: a canned result instead of running the model;
- ``all``: canned reply bytes (no parsing at all: the aio echo floor with Run's bytes).

Measured round-robin with the bare grpcio echo (sync and aio) and the real daemon
(its main port, and its native data port where the extension has one), every
server with OMP_NUM_THREADS=1; medians over rounds. A variant that calls the
runner directly also reports the runner's own time per call inside the server.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))


def serve(pkg: str, ready: str) -> None:
    from aotiserve.server import run_wire
    from aotiserve.server import tensor_codec as codec
    from aotiserve.server.config import ServeConfig
    from aotiserve.server.dataplane import DataPlane
    from aotiserve.server.device_pool import DevicePool
    from aotiserve.server.metrics import Metrics
    from aotiserve.server.model_registry import ModelRegistry
    from aotiserve.server.native_servicer import WEIGHTS_VERSION_TRAILER

    config = ServeConfig(devices=("cpu",), runners_per_model=2)
    metrics = Metrics()
    pools = {d: DevicePool(d, config.max_queue, metrics) for d in config.devices}
    registry = ModelRegistry(pools, config.devices, 2, metrics)
    plane = DataPlane(config, registry, metrics)
    registry.load("mlp", pkg, registry.options())
    req_c = metrics.requests.labels("mlp", "Run", "OK")
    req_s = metrics.request_seconds.labels("mlp", "Run")

    strip = set(os.environ.get("STRIP", "").split(","))
    import torch
    canned = plane.run(registry.get("mlp"), [torch.zeros(1, 64)], None, None)
    canned_bytes = run_wire.write_run_response(canned.outputs, [codec.wire_dtype(t.dtype) for t in canned.outputs],
                                               canned.weights_version)

    timings = []

    async def run(request, context):
        if "all" in strip:
            return canned_bytes
        began = time.monotonic()
        model = plane.model(request.model)
        inputs = plane.decode_inputs(model, request.inputs)
        if "model" in strip:
            result = canned
        elif "plane" in strip:
            t0 = time.perf_counter()
            outs = model.replicas[0].runner.run_holding_gil(inputs)
            timings.append(time.perf_counter() - t0)
            result = canned.__class__(outs, canned.weights_version)
        else:
            result = plane.run(model, inputs, None, None)
        if "trailer" not in strip:
            context.set_trailing_metadata(((WEIGHTS_VERSION_TRAILER, result.weights_version),))
        out = run_wire.write_run_response(result.outputs, [codec.wire_dtype(t.dtype) for t in result.outputs],
                                          result.weights_version)
        if "metrics" not in strip:
            req_c.inc()
            req_s.observe(time.monotonic() - began)
        return out

    async def main() -> None:
        handler = grpc.method_handlers_generic_handler("aotiserve.v1.ModelRunner", {
            "Run": grpc.unary_unary_rpc_method_handler(
                run, request_deserializer=run_wire.parse_run_request, response_serializer=run_wire.identity)})
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        Path(ready).write_text(json.dumps({"port": port, "pid": os.getpid()}))
        done = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, done.set)
        await done.wait()
        await server.stop(0)
        if timings:
            import statistics
            print(f"  [{os.environ.get('STRIP')}] the runner's own time inside the server: median "
                  f"{statistics.median(timings) * 1e6:.1f} us over {len(timings)} calls", file=sys.stderr)

    asyncio.run(main())


def bench(variants: list[str], rounds: int) -> None:
    import subprocess

    import model_zoo
    from bench import procs
    from bench.run_all import payload_sizes, run_driver

    pkg = model_zoo.compiled("mlp")
    work = procs.tmpdir("aio-probe-")
    ready = work / "ready"
    protos, targets = [], {}
    for v in variants:
        ready = work / f"ready-{len(protos)}"
        protos.append(subprocess.Popen([sys.executable, __file__, "serve", str(pkg), str(ready)],
                                       env=dict(os.environ, STRIP=v, OMP_NUM_THREADS="1")))
        while not ready.exists():
            time.sleep(0.1)
        targets[v] = f"127.0.0.1:{json.loads(ready.read_text())['port']}"
    req_size, resp_size = payload_sizes()
    echo = procs.start_echo(work / "e", resp_size)
    echo_aio = procs.start_echo(work / "ea", resp_size, aio=True)
    from aotiserve import runner_ext

    fast = ["--native-run-port", "0"] if runner_ext.native_run_available() else []
    daemon = procs.start_aotiserve(work / "d", {"mlp": pkg}, env={"OMP_NUM_THREADS": "1"},
                                   extra_args=fast)
    base = {"seq_n": 1000, "warmup": 200, "concurrency": [1, 8], "duration": 2.0, "mode": "threads",
            "input_shapes": [[1, 64]], "model": "mlp"}
    systems = {
        "echo": dict(base, kind="echo", target=echo.target, req_size=req_size, runrequest=True),
        "echo_aio": dict(base, kind="echo", target=echo_aio.target, req_size=req_size, runrequest=True),
        "daemon": dict(base, kind="native", target=daemon.target),
    }
    if daemon.extra["ready"].get("native_run_port"):  # the daemon's gRPC C++ Run
        systems["daemon native port"] = dict(
            base, kind="native", target=f"127.0.0.1:{daemon.extra['ready']['native_run_port']}")
    for v, t in targets.items():
        systems["aio-" + v] = dict(base, kind="native", target=t)
    res = {k: [] for k in systems}
    try:
        for _ in range(rounds):
            for k, cfg in systems.items():
                r = run_driver(sys.executable, cfg)
                tp = {c["concurrency"]: c["rps"] for c in r["throughput"]}
                res[k].append((r["sequential"]["p50_us"], tp[8]))
        med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
        for k, v in res.items():
            p50, r8 = med([x[0] for x in v]), med([x[1] for x in v])
            print(f"{k:28} p50 {p50:6.0f}  rps8 {r8:6.0f}   p50/echo {p50 / med([x[0] for x in res['echo']]):.2f}"
                  f"  rps8/echo {r8 / med([x[1] for x in res['echo']]):.2f}")
    finally:
        for proto in protos:
            proto.send_signal(signal.SIGTERM)
        for proto in protos:
            proto.wait(30)
        for s in (echo, echo_aio, daemon):
            s.stop()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3])
    else:
        import argparse

        ap = argparse.ArgumentParser(prog="python -m bench.aio_ladder", description=__doc__.split("\n\n")[0])
        ap.add_argument("--variants", default="none;metrics;metrics,trailer;metrics,trailer,plane;"
                                              "metrics,trailer,model;all")
        ap.add_argument("--rounds", type=int, default=3)
        a = ap.parse_args()
        bench([v for v in a.variants.split(";") if v], a.rounds)
