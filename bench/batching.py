"""When dynamic batching pays: the daemon with batching off and on, side by side.

Clients send one-row requests. Two models: the zoo's ``compute_dyn`` (4 x
Linear(1024, 1024), dynamic batch: one row costs nearly as much as sixteen, as
the weights are read once per run) and the tiny ``mlp`` (a run costs
microseconds: gRPC's own work dominates). Each configuration is a fresh daemon
(``--runners-per-model 2``, OMP_NUM_THREADS=1) driven by ``bench/driver.py``;
configurations alternate over the rounds, and each figure is the median.

    python -m bench.batching [--rounds 2] [--duration 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CONFIGS = {
    "off": [],
    "on": ["--batch-max-size", "32", "--batch-max-delay-us", "1000"],
}
MODELS = {"compute_dyn": [[1, 1024]], "mlp": [[1, 64]]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / "tests"))
    import model_zoo  # noqa: E402 (the test zoo is the bench's zoo too)

    from bench import procs
    from bench.common import run_driver

    concurrency = [int(c) for c in args.concurrency.split(",")]
    packages = {m: model_zoo.compiled(m) for m in MODELS}
    runs: dict = {m: {c: {n: [] for n in concurrency} for c in CONFIGS} for m in MODELS}
    for _ in range(args.rounds):
        for model, shapes in MODELS.items():
            for config, extra in CONFIGS.items():
                server = procs.start_aotiserve(
                    procs.tmpdir(f"aotiserve-batch-{config}-"),
                    {model: packages[model]},
                    runners=2,
                    env={"OMP_NUM_THREADS": "1"},
                    extra_args=extra,
                )
                try:
                    res = run_driver(
                        sys.executable,
                        {
                            "kind": "run",
                            "target": server.target,
                            "model": model,
                            "input_shapes": shapes,
                            "concurrency": concurrency,
                            "duration": args.duration,
                            "mode": "threads",
                            "seq_n": 0,
                        },
                    )
                finally:
                    server.stop()
                for tp in res["throughput"]:
                    runs[model][config][tp["concurrency"]].append(
                        (tp["rps"], tp["latency"]["p50_us"])
                    )
    out: dict = {"models": {}, "rounds": args.rounds, "configs": CONFIGS}
    for model in MODELS:
        rows = {}
        for config in CONFIGS:
            for c in concurrency:
                xs = runs[model][config][c]
                rows[f"{config}_c{c}"] = {
                    "rps": statistics.median(r for r, _ in xs),
                    "p50_us": statistics.median(p for _, p in xs),
                }
        for c in concurrency:
            rows[f"on_over_off_c{c}"] = rows[f"on_c{c}"]["rps"] / rows[f"off_c{c}"]["rps"]
        out["models"][model] = rows
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print("one-row requests; batching on = --batch-max-size 32 --batch-max-delay-us 1000")
    print(
        f"{'model':12} {'clients':>7} {'off req/s':>10} {'on req/s':>9} {'on/off':>7} "
        f"{'off p50 µs':>11} {'on p50 µs':>10}"
    )
    for model, rows in out["models"].items():
        for c in concurrency:
            off, on = rows[f"off_c{c}"], rows[f"on_c{c}"]
            print(
                f"{model:12} {c:>7} {off['rps']:>10.0f} {on['rps']:>9.0f} "
                f"{rows[f'on_over_off_c{c}']:>7.2f} {off['p50_us']:>11.0f} {on['p50_us']:>10.0f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
