"""The compute-bound and large-payload workloads, on one aotiserve daemon.

compute: a model whose run takes milliseconds, 1 vs 2 clients alternating (does a
second client double the throughput?), next to the same model called in-process.
large: 64 MiB in and out through Run, aotiserve.client and both echo floors.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from . import procs
from .common import (
    COPIED_METRIC,
    ECHO_SYSTEMS,
    LABELS,
    LARGE_ENV,
    LARGE_ROWS,
    MIB,
    gbps_round_trip,
    median_of,
    memcpy_rates,
    rps_at,
    run_driver,
    run_reply,
)
from .procs import Server

if TYPE_CHECKING:
    from .run_all import Bench

log = logging.getLogger("bench")


def run(bench: Bench, pkgs: dict[str, Path], workloads: set[str]) -> None:
    """One daemon with 2 runners per model and OMP_NUM_THREADS=1 for compute and large."""
    runners = 2
    env = {"OMP_NUM_THREADS": "1"}
    max_msg = 160 * MIB
    models = {n: pkgs[n] for n in ("compute", "passthrough") if n in pkgs}
    try:
        server = procs.start_aotiserve(
            bench.work / "aotiserve-heavy",
            models,
            runners=runners,
            env=env,
            extra_args=["--max-message-bytes", str(max_msg)],
        )
    except (RuntimeError, TimeoutError) as exc:
        bench.note(f"aotiserve (compute/large daemon): skipped: {exc}")
        return
    settings = {"runners_per_model": runners, "OMP_NUM_THREADS": 1, "max_message_bytes": max_msg}
    try:
        if "large" in workloads:
            bench.results["large"] = large(bench, server) | {"server_settings": settings}
        if "compute" in workloads:
            bench.results["compute"] = compute(bench, server, pkgs) | {"server_settings": settings}
    finally:
        server.stop()


def large(bench: Bench, server: Server) -> dict:
    """64 MiB in, 64 MiB out: Run on the daemon's port (and through aotiserve.client), and the
    same RunRequest/RunResponse bytes through both echo floors. Every process of it (clients,
    echo servers) runs with the huge-page malloc setting ``aotiserve serve`` gives itself."""
    a = bench.args
    shapes = [[LARGE_ROWS, 1024]]
    nbytes = LARGE_ROWS * 1024 * 4
    out: dict = {
        "payload_mib": nbytes / MIB,
        "memory_before": server.memory(),
        "memcpy": memcpy_rates(nbytes),
        "process_env": LARGE_ENV,
    }
    cfg = {
        "kind": "run",
        "target": server.target,
        "model": "passthrough",
        "input_shapes": shapes,
        "seq_n": a.large_n,
        "warmup": 1,
    }
    # The daemon's peak over these calls (VmHWM reset first): the payloads it held at once.
    procs.reset_peak_memory(server.pid)
    before, copied = server.memory(), procs.metric(server, COPIED_METRIC)
    res = bench.measure("run", server, cfg, env=LARGE_ENV, sampler=False)
    growth = server.memory()["hwm_mib"] - before["rss_mib"]
    out["run"] = res["sequential"] | {
        "gbps_round_trip": gbps_round_trip(nbytes, res),
        "peak_growth_mib": growth,
        "payloads_held_at_peak": round(growth / (nbytes / MIB), 2),
        "hot_path_share": res.get("hot_path_share"),
        "server_cpu_us_per_call": res.get("server_cpu_us_per_call"),
    }
    if copied is not None:
        # The port counts the payload bytes it copies: per request, in payloads of 64 MiB.
        done = procs.metric(server, COPIED_METRIC)
        out["run"]["port_copies_per_request"] = round(
            (done - copied) / res["calls_total"] / nbytes, 3
        )
    if "client" in bench.args.systems:  # aotiserve's own client library on the same port
        try:
            c = run_driver(sys.executable, dict(cfg, kind="client"), env=LARGE_ENV)
            out["client"] = c["sequential"] | {"gbps_round_trip": gbps_round_trip(nbytes, c)}
        except RuntimeError as exc:
            bench.note(f"64 MiB through aotiserve.client: {exc}")
    out["gbps_round_trip"] = out["run"]["gbps_round_trip"]
    # The same bytes through the bare echo floors: what each transport alone allows here.
    reply = run_reply(server.target, "passthrough", shapes, shapes[0])
    for key in ECHO_SYSTEMS:
        if key not in bench.args.systems:
            continue
        try:
            echo = procs.start_echo(
                bench.work / f"{key}-large",
                reply,
                cpp=key == "echo_cpp",
                workers=None if key == "echo_cpp" else 2,
                env=LARGE_ENV,
            )
        except (RuntimeError, TimeoutError) as exc:
            bench.note(f"64 MiB through {LABELS[key]}: skipped: {exc}")
            continue
        try:
            e = run_driver(
                sys.executable, dict(cfg, kind="echo", target=echo.target), env=LARGE_ENV
            )
            out[key] = e["sequential"] | {"gbps_round_trip": gbps_round_trip(nbytes, e)}
        finally:
            echo.stop()
    del reply
    log.info(
        "  large: Run %.2f GB/s round trip (%s)",
        out["gbps_round_trip"],
        ", ".join(
            f"{k} {out[k]['gbps_round_trip']:.2f} GB/s"
            for k in ("client", *ECHO_SYSTEMS)
            if k in out
        ),
    )
    return out


def compute(bench: Bench, server: Server, pkgs: dict[str, Path]) -> dict:
    a = bench.args
    out: dict = {}
    cfg = {
        "kind": "run",
        "target": server.target,
        "model": "compute",
        "input_shapes": [[64, 1024]],
        "seq_n": a.compute_seq_n,
        "warmup": 5,
        "concurrency": [1, 2] * a.compute_alternations,
        "duration": a.duration,
        "mode": "threads",
    }
    runs = []
    for r in range(a.rounds):
        run = {
            "aotiserve": bench.measure("run", server, cfg, sampler=False),
            "inproc": run_driver(
                sys.executable,
                dict(cfg, kind="inproc", package=str(pkgs["compute"]), num_runners=2),
            ),
        }
        runs.append(run)
        log.info(
            "  compute round %d: " + "; ".join(f"{who} 1c=%.1f/s 2c=%.1f/s (x%.2f)" for who in run),
            r + 1,
            *[
                x
                for who in run
                for x in (
                    rps_at(run[who], 1),
                    rps_at(run[who], 2),
                    rps_at(run[who], 2) / rps_at(run[who], 1),
                )
            ],
        )
    out["rounds"] = runs
    med = lambda who, c: median_of([rps_at(run[who], c) for run in runs])  # noqa: E731
    for who in runs[0]:
        out[f"{who}_rps"] = {"1": med(who, 1), "2": med(who, 2)}
        out[f"{who}_scaling_2_over_1"] = median_of(
            [rps_at(run[who], 2) / rps_at(run[who], 1) for run in runs]
        )
    out["hot_path_share"] = median_of([run["aotiserve"].get("hot_path_share") for run in runs])
    out["client_mode"] = (
        "threads (grpc releases the GIL while waiting; the client's work per call is small)"
    )
    return out
