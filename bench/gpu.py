"""The GPU figures of issue 16, side by side in one run on one machine.

The daemon serves everything on its one port (gRPC C++ in the extension; Run answered
by the C++ hot path). Every client is bench/driver.py, clients as separate processes:
grpcio and the generated protobuf classes for the tiny model (the echo floors get the
very same client), and aotiserve.client for ResNet-50 (with the plain client beside it).

1. Tiny CUDA model (the zoo's ``mlp`` compiled for cuda, [1,64] float32 -> [1,10]):
   - in-process: the extension's ``run()`` on the device, host array in and out (the
     same transfers the daemon makes per request), one thread;
   - the gRPC C++ echo floor (bench/echo_server.cc) and the grpcio echo floor, answering
     the same RunRequest with the bytes the daemon answers;
   - aotiserve Run.
   Check: aotiserve p50 - in-process p50 <= C++ echo p50 + 30 us.
2. ResNet-50 (torchvision where importable, else bench/resnet.py; random init) fp32,
   batch 8 (4.8 MB requests): 4 clients' img/s against the daemon vs 4 threads of this
   process calling ``run()`` on a container of the same package with as many runners as
   the daemon has, on the same device, in the same run; p50 and p99 of both. The clients
   are ``aotiserve.client`` (what users call; it sends tensors' bytes without a protobuf
   copy); the same figures with a plain grpcio + protobuf client are printed beside them
   (that client's own encoding of 4.8 MB is most of its time per call).
   Check: daemon img/s (aotiserve.client) >= 0.8 x in-process.
3. ``--devices N`` (N >= 2): ResNet-50 req/s with 8 clients on a daemon serving on one
   GPU vs one serving on N (replicas on each, least-loaded chosen by the port).

    python -m bench.gpu [--json OUT] [--runners 4] [--devices 2] [--rounds 3]

Where gRPC C++ is not installed system-wide, bench/gpu_recipe.sh sets PKG_CONFIG_* so
that the C++ echo builds against the same unpacked gRPC the extension was built with.
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

from bench import procs  # noqa: E402
from bench.common import (  # noqa: E402
    hot_calls,
    run_driver,
    run_reply,
    server_times,
    server_us_per_request,
)

TINY_SHAPES = [[1, 64]]


def _p(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def inproc_call(package: Path, device: str, shape: list[int], runners: int):
    """(call, model): one ``run()`` on ``device`` in this process per call, host array in and
    out (the transfers the daemon makes per request), each thread on a stream of its own;
    close the model when done."""
    import torch

    from aotiserve.runner_ext import load_model

    model = load_model(package, device=device, num_runners=runners)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    local = threading.local()
    cuda = device.startswith("cuda")

    def call() -> None:
        if not cuda:
            model.runner.run([torch.from_numpy(x)])[0].numpy()
            return
        if not hasattr(local, "stream"):
            local.stream = torch.cuda.Stream(device=device)
        with torch.cuda.stream(local.stream):
            inp = torch.from_numpy(x).to(device, non_blocking=True)
            out = model.runner.run([inp], local.stream.cuda_stream)
            out[0].cpu().numpy()

    return call, model


def in_process(
    package: Path, device: str, shape: list[int], n: int, threads: int, seconds: float, runners: int
) -> dict:
    """``run()`` on ``device`` in this process: sequential latency, then ``threads`` threads
    calling back to back for ``seconds`` (latency of every call, and calls/s)."""
    call, model = inproc_call(package, device, shape, runners)
    for _ in range(min(200, max(20, n // 5))):
        call()
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        lat.append((time.perf_counter() - t0) * 1e6)
    out = {"sequential": {"p50_us": statistics.median(lat), "p99_us": _p(lat, 0.99)}}
    counts = [0] * threads
    lats: list[list[float]] = [[] for _ in range(threads)]
    start = time.perf_counter() + 0.2
    stop = start + seconds

    def work(i: int) -> None:
        while time.perf_counter() < start:  # every thread warm and going before the window
            call()
        while (t0 := time.perf_counter()) < stop:
            call()
            t1 = time.perf_counter()
            if t1 < stop:
                counts[i] += 1
                lats[i].append((t1 - t0) * 1e6)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    every = [x for xs in lats for x in xs]
    out["concurrent"] = {
        "threads": threads,
        "rps": sum(counts) / seconds,
        "p50_us": statistics.median(every),
        "p99_us": _p(every, 0.99),
    }
    model.close()  # the runners go now, not whenever the closure above is collected
    return out


def _driver(
    target: str,
    kind: str,
    model: str,
    shapes,
    n: int,
    clients: list[int],
    seconds: float,
    warmup: int,
) -> dict:
    cfg = {
        "kind": kind,
        "target": target,
        "model": model,
        "input_shapes": shapes,
        "seq_n": n,
        "warmup": warmup,
        "concurrency": clients,
        "duration": seconds,
        "mode": "procs",
    }
    return run_driver(sys.executable, cfg)


def _tp(res: dict, c: int) -> dict:
    return next(t for t in res["throughput"] if t["concurrency"] == c)


def _med(xs) -> float:
    return statistics.median(xs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument(
        "--device", default="cuda:0", help="the device (cpu only to try the bench itself)"
    )
    parser.add_argument(
        "--runners", type=int, default=4, help="runners per model, daemon and in-process alike"
    )
    parser.add_argument(
        "--n", type=int, default=2000, help="sequential calls per system, tiny model"
    )
    parser.add_argument("--resnet-n", type=int, default=200, help="sequential calls, ResNet-50")
    parser.add_argument("--seconds", type=float, default=3.0, help="throughput window")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the servers (medians)")
    parser.add_argument("--batch", type=int, default=8, help="ResNet-50 batch")
    parser.add_argument(
        "--devices",
        type=int,
        default=1,
        help="N >= 2 adds ResNet-50 req/s with 8 clients on one GPU vs N GPUs",
    )
    parser.add_argument("--skip-resnet", action="store_true")
    parser.add_argument(
        "--no-slot-threads",
        action="store_true",
        help="also measure a second daemon with --no-gpu-slot-threads (each request run on the "
        "gRPC thread that took it), in the same rounds",
    )
    args = parser.parse_args(argv)

    import model_zoo
    import torch

    from bench import resnet

    dev = args.device
    kind = "cuda" if dev.startswith("cuda") else "cpu"
    results: dict = {
        "device": torch.cuda.get_device_name(dev) if kind == "cuda" else "cpu",
        "device_count": torch.cuda.device_count() if kind == "cuda" else 0,
        "torch": torch.__version__,
        "settings": vars(args),
    }
    notes: list[str] = results.setdefault("notes", [])
    tiny_pkg = model_zoo.compiled("mlp", device=kind)
    models = {"mlp": tiny_pkg}
    resnet_shape = [args.batch, 3, 224, 224]
    if not args.skip_resnet:
        t0 = time.time()
        rn_pkg, source = resnet.package(kind, args.batch)
        models["resnet50"] = rn_pkg
        results["resnet50"] = {
            "source": source,
            "input": resnet_shape,
            "request_mb": np.prod(resnet_shape) * 4 / 1e6,
            "compile_or_cache_s": round(time.time() - t0, 1),
        }

    # In-process first, alone on the device (the daemon is not up yet).
    results["inproc_tiny"] = in_process(tiny_pkg, dev, TINY_SHAPES[0], args.n, 1, 1.0, 1)
    if not args.skip_resnet:
        results["inproc_resnet50"] = [
            in_process(
                models["resnet50"], dev, resnet_shape, args.resnet_n, 4, args.seconds, args.runners
            )
            for _ in range(args.rounds)
        ]

    work = procs.tmpdir("aotiserve-gpu-bench-")
    servers: dict[str, procs.Server] = {}
    try:
        servers["aotiserve"] = procs.start_aotiserve(
            work / "aotiserve", models, runners=args.runners, extra_args=["--devices", dev]
        )
        daemon = servers["aotiserve"]
        daemons = {"aotiserve": daemon}
        if args.no_slot_threads:
            servers["aotiserve_no_slots"] = daemons["aotiserve_no_slots"] = procs.start_aotiserve(
                work / "aotiserve-no-slots",
                models,
                runners=args.runners,
                extra_args=["--devices", dev, "--no-gpu-slot-threads"],
            )
        reply = run_reply(daemon.target, "mlp", TINY_SHAPES, [1, 10])
        for name, cpp in (("echo_cpp", True), ("echo", False)):
            try:
                servers[name] = procs.start_echo(work / name, reply, cpp=cpp)
            except Exception as exc:  # noqa: BLE001 - a floor that cannot run is noted, not fatal
                notes.append(f"{name}: skipped: {exc}")
        tiny: dict[str, list] = {k: [] for k in servers}
        rn: dict[str, list[dict]] = {"client": [], "run": []}
        if args.no_slot_threads:
            rn["client_no_slots"] = []
        for _ in range(args.rounds):
            for key, server in servers.items():
                before = server_times(server.target, "mlp") if key in daemons else None
                tiny[key].append(
                    _driver(
                        server.target,
                        "run" if key in daemons else "echo",
                        "mlp",
                        TINY_SHAPES,
                        args.n,
                        [1, 4],
                        args.seconds,
                        200,
                    )
                )
                if before is not None:
                    tiny[key][-1]["server_us"] = server_us_per_request(
                        before, server_times(server.target, "mlp")
                    )
            for rn_key in () if args.skip_resnet else rn:
                client_kind, _, variant = rn_key.partition("_")
                target = daemons["aotiserve_" + variant if variant else "aotiserve"]
                before = server_times(target.target, "resnet50")
                hot0 = hot_calls(target)
                res = _driver(
                    target.target,
                    client_kind,
                    "resnet50",
                    [resnet_shape],
                    args.resnet_n,
                    [4],
                    args.seconds,
                    10,
                )
                hot1 = hot_calls(target)
                res["server_us"] = server_us_per_request(
                    before, server_times(target.target, "resnet50")
                )
                if hot0 is not None:
                    res["hot_path_share"] = (hot1 - hot0) / res["calls_total"]
                rn[rn_key].append(res)
        results["tiny"] = {
            k: {
                "p50_us": _med(r["sequential"]["p50_us"] for r in runs),
                "p99_us": _med(r["sequential"]["p99_us"] for r in runs),
                "rps_1": _med(_tp(r, 1)["rps"] for r in runs),
                "rps_4": _med(_tp(r, 4)["rps"] for r in runs),
                "p50_us_rounds": [round(r["sequential"]["p50_us"], 1) for r in runs],
                # The daemon's own split of a request (every call of the rounds), per round.
                **({"server_us": [r["server_us"] for r in runs]} if "server_us" in runs[0] else {}),
            }
            for k, runs in tiny.items()
        }
        rn_keys = {
            "client": "aotiserve",
            "run": "aotiserve_plain_client",
            "client_no_slots": "aotiserve_no_slots",
        }
        for rn_key, runs in rn.items():
            if not runs:
                continue
            results["resnet50"][rn_keys[rn_key]] = {
                "client": "grpcio + protobuf" if rn_key == "run" else "aotiserve.client",
                "p50_us_1_client": _med(r["sequential"]["p50_us"] for r in runs),
                "p99_us_1_client": _med(r["sequential"]["p99_us"] for r in runs),
                "rps_4": _med(_tp(r, 4)["rps"] for r in runs),
                "p50_us_4": _med(_tp(r, 4)["latency"]["p50_us"] for r in runs),
                "p99_us_4": _med(_tp(r, 4)["latency"]["p99_us"] for r in runs),
                "errors": sum(_tp(r, 4)["errors"] for r in runs),
                "hot_path_share": _med(r.get("hot_path_share", float("nan")) for r in runs),
                "server_us": [r["server_us"] for r in runs],
            }
        if rn["client"]:
            ip = results["inproc_resnet50"]
            results["resnet50"]["inproc"] = {
                "p50_us_1_thread": _med(r["sequential"]["p50_us"] for r in ip),
                "p99_us_1_thread": _med(r["sequential"]["p99_us"] for r in ip),
                "rps_4": _med(r["concurrent"]["rps"] for r in ip),
                "p50_us_4": _med(r["concurrent"]["p50_us"] for r in ip),
                "p99_us_4": _med(r["concurrent"]["p99_us"] for r in ip),
            }
        results["tiny_rounds"] = tiny
        results["resnet50_rounds"] = rn
        for s in servers.values():
            s.stop()
        servers.clear()

        if args.devices >= 2 and not args.skip_resnet:
            if kind != "cuda" or torch.cuda.device_count() < args.devices:
                notes.append(
                    f"--devices {args.devices}: only {results['device_count']} GPU(s) here: skipped"
                )
            else:
                many = ",".join(f"cuda:{i}" for i in range(args.devices))
                rows: dict[str, list] = {"1": [], str(args.devices): []}
                for label, devs in (("1", dev), (str(args.devices), many)):
                    server = procs.start_aotiserve(
                        work / f"devices-{label}",
                        {"resnet50": models["resnet50"]},
                        runners=args.runners,
                        extra_args=["--devices", devs],
                    )
                    servers[label] = server
                for _ in range(args.rounds):
                    for label in rows:
                        r = _driver(
                            servers[label].target,
                            "run",
                            "resnet50",
                            [resnet_shape],
                            0,
                            [8],
                            args.seconds,
                            0,
                        )
                        rows[label].append(_tp(r, 8))
                results["devices"] = {
                    label: {
                        "rps_8": _med(t["rps"] for t in ts),
                        "p50_us_8": _med(t["latency"]["p50_us"] for t in ts),
                        "p99_us_8": _med(t["latency"]["p99_us"] for t in ts),
                    }
                    for label, ts in rows.items()
                }
    finally:
        for s in servers.values():
            s.stop()

    t = results["tiny"]
    inproc = results["inproc_tiny"]["sequential"]["p50_us"]
    checks: dict = {}
    if "aotiserve" in t:
        overhead = t["aotiserve"]["p50_us"] - inproc
        checks["tiny_aotiserve_minus_inproc_p50_us"] = round(overhead, 1)
        if "echo_cpp" in t:
            checks["tiny_echo_cpp_p50_plus_30_us"] = round(t["echo_cpp"]["p50_us"] + 30, 1)
            checks["tiny_latency_ok"] = overhead <= t["echo_cpp"]["p50_us"] + 30
    if "aotiserve_no_slots" in t:
        checks["tiny_no_slot_threads_minus_inproc_p50_us"] = round(
            t["aotiserve_no_slots"]["p50_us"] - inproc, 1
        )
    r = results.get("resnet50", {})
    if "aotiserve" in r and "inproc" in r:
        checks["resnet50_img_s_4_clients"] = round(r["aotiserve"]["rps_4"] * args.batch, 1)
        checks["resnet50_img_s_4_inproc_threads"] = round(r["inproc"]["rps_4"] * args.batch, 1)
        checks["resnet50_ratio"] = round(r["aotiserve"]["rps_4"] / r["inproc"]["rps_4"], 3)
        if "aotiserve_plain_client" in r:
            checks["resnet50_ratio_plain_client"] = round(
                r["aotiserve_plain_client"]["rps_4"] / r["inproc"]["rps_4"], 3
            )
        if "aotiserve_no_slots" in r:
            checks["resnet50_ratio_no_slot_threads"] = round(
                r["aotiserve_no_slots"]["rps_4"] / r["inproc"]["rps_4"], 3
            )
        checks["resnet50_ok"] = checks["resnet50_ratio"] >= 0.8
    d = results.get("devices")
    if d:
        checks[f"devices_{args.devices}_over_1_rps_8"] = round(
            d[str(args.devices)]["rps_8"] / d["1"]["rps_8"], 3
        )
    results["checks"] = checks

    print(
        f"device: {results['device']} ({results['device_count']} GPU(s)); torch {results['torch']}"
    )
    print(f"tiny model [1,64] -> [1,10], medians of {args.rounds} round(s):")
    print(f"  {'system':16} {'p50 us':>9} {'p99 us':>9} {'rps 1c':>9} {'rps 4c':>9}  p50 per round")
    print(
        f"  {'in-process':16} {inproc:9.1f} {results['inproc_tiny']['sequential']['p99_us']:9.1f}"
    )
    for k, v in t.items():
        print(
            f"  {k:16} {v['p50_us']:9.1f} {v['p99_us']:9.1f} {v['rps_1']:9.0f} {v['rps_4']:9.0f}  {v['p50_us_rounds']}"
        )
    for k in ("aotiserve", "aotiserve_no_slots"):
        if "server_us" in t.get(k, {}):
            print(f"  {k}: the daemon's time per request, per round (µs): {t[k]['server_us']}")
    if "aotiserve" in r:
        i = r["inproc"]
        print(
            f"ResNet-50 ({r['source']}) fp32 batch {args.batch}, {r['request_mb']:.1f} MB requests, "
            f"{args.runners} runners:"
        )
        for key, label in (
            ("aotiserve", "aotiserve.client"),
            ("aotiserve_plain_client", "plain grpcio client"),
            ("aotiserve_no_slots", "--no-gpu-slot-threads"),
        ):
            if key not in r:
                continue
            a = r[key]
            print(
                f"  {label + ', 4 clients:':28} {a['rps_4'] * args.batch:8.0f} img/s  p50 {a['p50_us_4'] / 1e3:7.2f} ms  "
                f"p99 {a['p99_us_4'] / 1e3:7.2f} ms  (1 client: p50 {a['p50_us_1_client'] / 1e3:.2f} ms, "
                f"p99 {a['p99_us_1_client'] / 1e3:.2f} ms; hot path {100 * a['hot_path_share']:.0f}%)"
            )
            print(f"    the daemon's time per request, per round (µs): {a['server_us']}")
        print(
            f"  in-process, 4 threads:       {i['rps_4'] * args.batch:8.0f} img/s  p50 {i['p50_us_4'] / 1e3:7.2f} ms  "
            f"p99 {i['p99_us_4'] / 1e3:7.2f} ms  (1 thread: p50 {i['p50_us_1_thread'] / 1e3:.2f} ms, "
            f"p99 {i['p99_us_1_thread'] / 1e3:.2f} ms)"
        )
    if d:
        for label, v in d.items():
            print(
                f"  ResNet-50, 8 clients, {label} GPU(s): {v['rps_8']:8.0f} req/s ({v['rps_8'] * args.batch:.0f} img/s) "
                f"p50 {v['p50_us_8'] / 1e3:.2f} ms p99 {v['p99_us_8'] / 1e3:.2f} ms"
            )
    for n in notes:
        print(f"note: {n.splitlines()[0]}")
    print(json.dumps(checks))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
