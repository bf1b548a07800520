"""The side-by-side benchmark: ``make bench`` (or ``python -m bench.run_all``).

Measures, in one run on this machine, the same tiny AOTI MLP ([1,64] float32 in,
[1,10] out) served by: the extension called in-process, two bare echo floors with
the same payloads (gRPC C++, built like the daemon's port, and grpcio), aotiserve's
one port (Run and Open Inference Protocol ModelInfer, both answered by its C++ hot
path; Run also through ``aotiserve.client``), KServe 0.21 and PyTriton 0.7. Then a
compute-bound model on aotiserve (1 vs 2 clients), a 64 MiB round trip, and memory.

Every system is driven by one client library (grpcio with the generated protobuf
classes, bench/driver.py) from a separate process. All servers of the tiny workload
are up together and measured round-robin for ``--rounds`` rounds; the report gives
the median over rounds and the acceptance ratios of issue 16. Results go to
``bench/results/<date>-<machine>.json`` and ``docs/benchmarks.md`` (+ PNG plots).

The workloads live in bench/tiny.py and bench/heavy.py, what they share in
bench/common.py, the ratios and targets in bench/ratios.py, the report in bench/report.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import heavy, procs, tiny
from .common import (
    AOTISERVE_SYSTEMS,
    DOCS,
    RESULTS_DIR,
    TINY_SYSTEMS,
    WORKLOADS,
    RssSampler,
    cpu_seconds,
    hot_calls,
    machine_info,
    machine_name,
    packages,
    run_driver,
)
from .procs import Server
from .ratios import ratios

log = logging.getLogger("bench")


class Bench:
    """One run: the servers it started, its notes, its results; workloads call back into it."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.notes: list[str] = []
        self.servers: dict[str, Server] = {}
        self.work = procs.tmpdir("aotiserve-bench-")
        self.results: dict = {"notes": self.notes}

    def note(self, msg: str) -> None:
        log.warning("%s", msg)
        self.notes.append(msg)

    def server_of(self, system: str) -> Server | None:
        return self.servers.get("aotiserve" if system in AOTISERVE_SYSTEMS else system)

    def stop_all(self) -> None:
        for s in list(self.servers.values()):
            s.stop()
        self.servers.clear()

    def measure(
        self,
        system: str,
        server: Server | None,
        cfg: dict,
        env: dict | None = None,
        sampler: bool = True,
    ) -> dict:
        """One driver run against ``server``: adds the server's CPU per call and, for aotiserve,
        the share of the calls its C++ hot path answered (from its own counter)."""
        hot0 = hot_calls(server) if server and system in AOTISERVE_SYSTEMS else None
        cpu0 = cpu_seconds(server.pid) if server else 0.0
        with RssSampler(server if sampler else None) as s:
            out = run_driver(sys.executable, cfg, env=env)
        out["rss_peak"] = s.peak
        calls = out.get("calls_total")
        if server and calls:
            out["server_cpu_us_per_call"] = 1e6 * (cpu_seconds(server.pid) - cpu0) / calls
        if calls:
            out["client_cpu_us_per_call"] = 1e6 * out["client_cpu_s"] / calls
        if hot0 is not None and calls:
            out["hot_path_share"] = (hot_calls(server) - hot0) / calls
        return out

    def run(self) -> dict:
        a = self.args
        started = time.time()
        self.results["meta"] = {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(),
            "command": " ".join([Path(sys.executable).name, "-m", "bench.run_all", *sys.argv[1:]]),
            "settings": {k: v for k, v in vars(a).items() if k not in ("out", "docs")},
            # Others may share this machine: the load before we start tells.
            "loadavg_start": os.getloadavg(),
        }
        names = ["mlp"]
        if "compute" in a.workloads:
            names.append("compute")
        if "large" in a.workloads:
            names.append("passthrough")
        pkgs = packages(names)
        try:
            if "tiny" in a.workloads or "memory" in a.workloads:
                tiny.run(self, pkgs)
            if {"compute", "large"} & set(a.workloads):
                heavy.run(self, pkgs, set(a.workloads))
        finally:
            self.stop_all()
            shutil.rmtree(self.work, ignore_errors=True)
        self.results["ratios"] = ratios(self.results)
        self.results["meta"]["wall_s"] = round(time.time() - started, 1)
        self.results["meta"]["loadavg_end"] = os.getloadavg()
        return self.results


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.run_all", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help=f"comma list of {', '.join(WORKLOADS)} (default: all)",
    )
    ap.add_argument(
        "--systems",
        default=",".join(TINY_SYSTEMS),
        help=f"comma list of {', '.join(TINY_SYSTEMS)} (default: all that can run)",
    )
    ap.add_argument("--no-peers", action="store_true", help="leave out KServe and PyTriton")
    ap.add_argument(
        "--no-install", action="store_true", help="skip peers that are not installed yet"
    )
    ap.add_argument(
        "--quick", action="store_true", help="a few-second smoke run (1 round, short windows)"
    )
    ap.add_argument(
        "--scale", type=float, default=1.0, help="multiplies every duration and call count"
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="round-robin rounds over the systems; figures are medians over rounds",
    )
    ap.add_argument("--concurrency", default="1,4,8,16", help="client counts for throughput")
    ap.add_argument(
        "--mode",
        choices=("threads", "procs"),
        default="threads",
        help="concurrent clients as threads of one client process, or as processes",
    )
    ap.add_argument(
        "--runners",
        type=int,
        default=None,
        help="--runners-per-model for the tiny daemon (default: the daemon's own default)",
    )
    ap.add_argument(
        "--out",
        default=None,
        help="results JSON path (default bench/results/<date>-<machine>.json)",
    )
    ap.add_argument(
        "--docs",
        default=None,
        help="markdown report path (default docs/benchmarks.md; 'none' to skip)",
    )
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument(
        "--report-only",
        metavar="JSON",
        help="measure nothing: rewrite the report and plots from an earlier results file",
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    a.workloads = [w for w in a.workloads.split(",") if w]
    a.systems = [s for s in a.systems.split(",") if s]
    for w in a.workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r}")
    for s in a.systems:
        if s not in TINY_SYSTEMS:
            ap.error(f"unknown system {s!r}")
    if a.no_peers:
        a.systems = [s for s in a.systems if s not in ("kserve", "pytriton")]
    a.concurrency = [int(c) for c in a.concurrency.split(",") if c]
    sc = a.scale
    if a.quick:
        a.rounds = 1
        a.seq_n, a.warmup, a.duration = 100, 20, 0.3
        a.seq_block = 20
        a.large_n, a.compute_seq_n, a.compute_alternations = 2, 5, 1
    else:
        a.seq_n, a.warmup, a.duration = (
            max(50, int(1000 * sc)),
            max(20, int(200 * sc)),
            max(0.3, 2.0 * sc),
        )
        a.seq_block = max(10, a.seq_n // 10)  # 10 turns of each system per round
        a.large_n, a.compute_seq_n = max(2, int(10 * sc)), max(5, int(30 * sc))
        a.compute_alternations = (
            3  # 1, 2, 1, 2, 1, 2 clients: drift in others' load hits both alike
        )
    a.idle_probe = 0.5 if a.quick else 2.0
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
    )
    from . import report  # matplotlib is needed only here

    if args.report_only:
        out = Path(args.report_only)
        results = json.loads(out.read_text())
        if "tiny" in results:  # summaries are recomputed from the raw rounds
            results["tiny"]["summary"] = tiny.summarize(
                results["tiny"]["rounds"], results["tiny"]["systems"]
            )
        results["ratios"] = ratios(results)
        docs = Path(args.docs) if args.docs and args.docs != "none" else DOCS
        docs.parent.mkdir(parents=True, exist_ok=True)
        plots = [] if args.no_plots else report.plots(results, docs.parent / "img")
        docs.write_text(report.markdown(results, out, plots, docs.parent))
        print(report.summary_table(results))
        return 0
    results = Bench(args).run()
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    # A --quick smoke run is not a result worth keeping: it goes to a temporary folder unless
    # --out says.
    if args.out:
        out = Path(args.out)
    elif args.quick:
        out = (
            Path(tempfile.mkdtemp(prefix="aotiserve-bench-quick-"))
            / f"{stamp}-{machine_name()}-quick.json"
        )
    else:
        out = RESULTS_DIR / f"{stamp}-{machine_name()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=float) + "\n")
    log.info("results: %s", out)
    docs = (
        None
        if args.docs == "none"
        else Path(args.docs)
        if args.docs
        else (None if args.quick else DOCS)
    )
    if docs:
        img_dir = docs.parent / "img"
        plots = [] if args.no_plots else report.plots(results, img_dir)
        docs.parent.mkdir(parents=True, exist_ok=True)
        docs.write_text(report.markdown(results, out, plots, docs.parent))
        log.info("report: %s", docs)
    print(report.summary_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
