"""Chooses a daemon setting by measurement: one aotiserve per value, measured round-robin.

    python -m bench.sweep AOTISERVE_GRPC_WORKERS=4,8,16,32 [--rounds 3] [--scale 0.5]

Each value gets its own daemon (the tiny MLP, OMP_NUM_THREADS=1), all up
together; every round measures each in turn (sequential p50, throughput with
1/8/16 clients, server CPU per call); the table gives medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys

from . import procs
from .run_all import RPS, cpu_seconds, median_of, packages, run_driver

log = logging.getLogger("bench.sweep")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("setting", help="ENV_NAME=v1,v2,...")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scale", type=float, default=0.5)
    ap.add_argument("--concurrency", default="1,8,16")
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    name, values = a.setting.split("=", 1)
    values = values.split(",")
    pkg = packages(["mlp"])["mlp"]
    work = procs.tmpdir("aotiserve-sweep-")
    servers = {}
    results: dict[str, list] = {v: [] for v in values}
    try:
        for v in values:
            servers[v] = procs.start_aotiserve(work / v, {"mlp": pkg}, env={"OMP_NUM_THREADS": "1", name: v})
        for r in range(a.rounds):
            for v, s in servers.items():
                cfg = {"kind": "native", "target": s.target, "model": "mlp", "input_shapes": [[1, 64]],
                       "seq_n": max(50, int(1000 * a.scale)), "warmup": 100,
                       "concurrency": [int(c) for c in a.concurrency.split(",")],
                       "duration": max(0.5, 3 * a.scale), "mode": "threads"}
                cpu0 = cpu_seconds(s.pid)
                out = run_driver(sys.executable, cfg)
                out["server_cpu_us_per_call"] = 1e6 * (cpu_seconds(s.pid) - cpu0) / out["calls_total"]
                results[v].append(out)
                log.info("%s=%s round %d: p50=%.0fus %s cpu/call=%.0fus", name, v, r + 1,
                         out["sequential"]["p50_us"],
                         " ".join(f"c{t['concurrency']}={t[RPS]:.0f}/s" for t in out["throughput"]),
                         out["server_cpu_us_per_call"])
    finally:
        for s in servers.values():
            s.stop()
        shutil.rmtree(work, ignore_errors=True)
    conc = a.concurrency.split(",")
    print(f"| {name} | p50 µs | " + " | ".join(f"req/s ×{c}" for c in conc) + " | server CPU µs/call |")
    print("|---|---|" + "---|" * len(conc) + "---|")
    table = {}
    for v, runs in results.items():
        row = {"p50_us": median_of([o["sequential"]["p50_us"] for o in runs]),
               "rps": {c: median_of([t[RPS] for o in runs for t in o["throughput"] if str(t["concurrency"]) == c])
                       for c in conc},
               "server_cpu_us_per_call": median_of([o["server_cpu_us_per_call"] for o in runs])}
        table[v] = row
        print(f"| {v} | {row['p50_us']:.0f} | " + " | ".join(f"{row['rps'][c]:.0f}" for c in conc)
              + f" | {row['server_cpu_us_per_call']:.0f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"setting": name, "table": table, "raw": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
