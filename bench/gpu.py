"""The GPU figures of the benchmark issue, side by side on one machine.

For a small CUDA model (the zoo MLP compiled for cuda, input [1, 64]):
- in-process: the extension's run() on cuda:0, host array in and out (the
  same transfers the daemon does per request);
- the bare grpcio echo floor with the same payload sizes;
- aotiserve's native Run with the model placed on cuda:0, 1 and 4 clients, on the
  daemon's main port and on its native data port (aotiserve_fast, where built);
- the daemon's core without gRPC (``DataPlane.run`` in this process, the same
  validation, admission, stream and copies a Run does): splits the daemon's
  overhead into the core's part and the transport's.
Checks: aotiserve p50 - in-process p50 <= echo p50 + 50 us, and throughput
with 4 concurrent clients >= 1.5x one client.

    python -m bench.gpu [--json OUT] [--runners 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from bench.procs import start_aotiserve, start_echo, tmpdir  # noqa: E402
from bench.run_all import run_driver  # noqa: E402


def _p(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def in_process(package: Path, n: int, threads: int, seconds: float) -> dict:
    import torch

    from aotiserve.runner_ext import load_model

    model = load_model(package, device="cuda:0", num_runners=max(threads, 1))
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    local = threading.local()

    def call() -> None:
        if not hasattr(local, "stream"):
            local.stream = torch.cuda.Stream()
        with torch.cuda.stream(local.stream):
            inp = torch.from_numpy(x).to("cuda:0", non_blocking=True)
            out = model.runner.run([inp], local.stream.cuda_stream)
            out[0].cpu().numpy()

    for _ in range(200):
        call()
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        lat.append((time.perf_counter() - t0) * 1e6)
    rates = {}
    for c in (1, threads):
        counts = [0] * c
        stop = time.perf_counter() + seconds

        def work(i: int) -> None:
            while time.perf_counter() < stop:
                call()
                counts[i] += 1

        ts = [threading.Thread(target=work, args=(i,)) for i in range(c)]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        rates[c] = sum(counts) / (time.perf_counter() - t0)
    return {"p50_us": statistics.median(lat), "p99_us": _p(lat, 0.99), "rps": rates}


def core(package: Path, n: int, runners: int, device: str = "cuda:0") -> dict:
    """``DataPlane.run`` on ``device`` in this process: a Run without the transport."""
    import torch

    from aotiserve.server.config import ServeConfig
    from aotiserve.server.dataplane import DataPlane
    from aotiserve.server.device_pool import DevicePool
    from aotiserve.server.model_registry import ModelRegistry

    config = ServeConfig(devices=(device,), runners_per_model=runners)
    pools = {d: DevicePool(d, config.max_queue) for d in config.devices}
    registry = ModelRegistry(pools, config.devices, runners)
    plane = DataPlane(config, registry)
    registry.load("mlp", package, registry.options())
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32))
    for _ in range(200):
        plane.run("mlp", [x])
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        plane.run("mlp", [x])
        lat.append((time.perf_counter() - t0) * 1e6)
    registry.close()
    return {"p50_us": statistics.median(lat), "p99_us": _p(lat, 0.99)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--runners", type=int, default=4, help="runners per model in the daemon")
    parser.add_argument("--n", type=int, default=2000, help="sequential calls per system")
    parser.add_argument("--seconds", type=float, default=3.0, help="throughput window")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of echo and daemon ports (medians)")
    args = parser.parse_args(argv)

    import torch

    import model_zoo

    package = model_zoo.compiled("mlp", device="cuda")
    gpu = torch.cuda.get_device_name(0)
    work = tmpdir("aotiserve-gpu-bench-")
    req = 64 * 4 + 32  # RunRequest bytes for [1, 64] float32, about
    results: dict = {"gpu": gpu, "model": "mlp [1,64] float32 -> [1,10], cuda:0"}
    results["inproc"] = in_process(package, args.n, 4, args.seconds)
    results["core"] = core(package, args.n, args.runners)

    from aotiserve import runner_ext

    # The daemon serves the model on its main port and, where the extension has it, on the
    # native data port (gRPC C++) too: both are measured, the checks use the faster. Echo and
    # daemon stay up while `rounds` rounds measure each in turn; figures are per-round medians
    # (the machine's noise moves all of them together within a round).
    native = ["--native-run-port", "0"] if runner_ext.native_run_available() else []
    echo = start_echo(work, resp_size=10 * 4 + 32)
    daemon = start_aotiserve(work, {"mlp": package}, runners=args.runners,
                             extra_args=["--devices", "cuda:0", *native])
    targets = {"echo": echo.target, "aotiserve": daemon.target}
    if native:
        targets["aotiserve_fast"] = f"127.0.0.1:{daemon.extra['ready']['native_run_port']}"
    rounds: dict[str, list] = {k: [] for k in targets}
    try:
        for _ in range(args.rounds):
            for key, target in targets.items():
                cfg = {"kind": "native", "target": target, "model": "mlp", "input_shapes": [[1, 64]]}
                if key == "echo":
                    cfg = {"kind": "echo", "target": target, "req_size": req}
                rounds[key].append(run_driver(sys.executable, cfg | {
                    "seq_n": args.n, "warmup": 200, "concurrency": [1, 4], "duration": args.seconds,
                    "mode": "procs"}))
    finally:
        daemon.stop()
        echo.stop()
    for key, runs in rounds.items():
        rps = {c: statistics.median(t["rps"] for r in runs for t in r["throughput"] if t["concurrency"] == c)
               for c in (1, 4)}
        results[key] = {"sequential": {"p50_us": statistics.median(r["sequential"]["p50_us"] for r in runs)},
                        "throughput": [{"concurrency": c, "rps": v} for c, v in rps.items()],
                        "rounds": runs}
    served = [k for k in targets if k != "echo"]
    p50 = {k: (results[k]["p50_us"] if k == "inproc" else results[k]["sequential"]["p50_us"])
           for k in ("inproc", "echo", *served)}
    best = min(served, key=p50.get)
    tput = {c["concurrency"]: c["rps"] for c in results[best]["throughput"]}
    overhead = p50[best] - p50["inproc"]
    results["checks"] = {
        "port": "native data port" if best == "aotiserve_fast" else "main port",
        "aotiserve_minus_inproc_p50_us": round(overhead, 1),
        "echo_floor_p50_plus_50_us": round(p50["echo"] + 50, 1),
        "latency_ok": overhead <= p50["echo"] + 50,
        "rps_4_over_1": round(tput[4] / tput[1], 2),
        "scaling_ok": tput[4] / tput[1] >= 1.5,
    }
    print(f"GPU: {gpu}")
    print(f"{'system':15} {'p50 us':>8} {'rps 1c':>9} {'rps 4c':>9}")
    print(f"{'in-process':15} {p50['inproc']:8.1f} {results['inproc']['rps'][1]:9.0f} {results['inproc']['rps'][4]:9.0f}")
    print(f"{'core':15} {results['core']['p50_us']:8.1f}")
    for k in ("echo", *served):
        tp = {c["concurrency"]: c["rps"] for c in results[k]["throughput"]}
        print(f"{k:15} {p50[k]:8.1f} {tp[1]:9.0f} {tp[4]:9.0f}")
    print("p50 per round (us): " + ", ".join(
        f"{k} {[round(r['sequential']['p50_us']) for r in results[k]['rounds']]}" for k in ("echo", *served)))
    print(json.dumps(results["checks"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
