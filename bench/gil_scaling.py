"""2-thread / 1-thread throughput of run(), ours vs torch._C._aoti, side by side.

The compute-bound model (4 x Linear(1024, 1024), batch 64) runs with
OMP_NUM_THREADS=1 and 2 model instances, so on 2 cores a runner that
releases the GIL should approach 2x and one that holds it stays near 1x.

    python -m bench.gil_scaling [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _throughput(runner, x, threads: int, seconds: float) -> float:
    stop = threading.Event()
    counts = [0] * threads

    def work(i: int) -> None:
        while not stop.is_set():
            runner.run([x])
            counts[i] += 1

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    time.sleep(seconds)  # measuring window, not a synchronisation wait
    stop.set()
    for w in workers:
        w.join()
    return sum(counts) / (time.perf_counter() - start)


def measure(seconds: float) -> dict:
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    import model_zoo

    from aotiserve import runner_ext

    package = model_zoo.compiled("compute")
    with zipfile.ZipFile(package) as zf, tempfile.TemporaryDirectory() as tmp:
        member = next(n for n in zf.namelist() if n.endswith(".wrapper.so"))
        so = Path(tmp) / "compute.so"
        so.write_bytes(zf.read(member))
        runners = {
            "aotiserve.runner_ext": runner_ext.AOTIModelContainerRunnerCpu(str(so), 2),
            "torch._C._aoti": torch._C._aoti.AOTIModelContainerRunnerCpu(str(so), 2),
        }
        x = model_zoo.MODELS["compute"].inputs(64)[0]
        results = {}
        for name, runner in runners.items():
            for _ in range(5):
                runner.run([x])
            one = _throughput(runner, x, 1, seconds)
            two = _throughput(runner, x, 2, seconds)
            results[name] = {
                "1_thread_per_s": round(one, 1),
                "2_threads_per_s": round(two, 1),
                "ratio": round(two / one, 3),
            }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring window per point")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args(argv)
    if os.environ.get("OMP_NUM_THREADS") != "1":
        # AOTI kernels read OMP_NUM_THREADS at start-up: re-run with it set.
        env = dict(os.environ, OMP_NUM_THREADS="1")
        return subprocess.call(
            [sys.executable, "-m", "bench.gil_scaling", *(argv or sys.argv[1:])], env=env, cwd=REPO
        )
    results = measure(args.seconds)
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"compute-bound model, OMP_NUM_THREADS=1, 2 model instances, {os.cpu_count()} cores")
    print(f"{'runner':24} {'1 thread/s':>11} {'2 threads/s':>12} {'2/1 ratio':>10}")
    for name, r in results.items():
        print(f"{name:24} {r['1_thread_per_s']:>11} {r['2_threads_per_s']:>12} {r['ratio']:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
