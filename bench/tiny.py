"""The tiny workload: the same tiny AOTI MLP served by every system, round-robin.

In-process extension call, the two echo floors (gRPC C++ and grpcio, answering the
bytes aotiserve answers), aotiserve's Run, OIP ModelInfer and aotiserve.client, KServe
and PyTriton; all up together, measured for ``--rounds`` rounds; figures are medians
over rounds (:func:`summarize`). In each round the sequential latency of every system is
measured first, the systems taking turns in blocks of calls (:func:`sequential_turns`), then
each system's throughput in turn. Memory at rest and under load comes with it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import peers, procs
from .common import (
    AOTISERVE_SYSTEMS,
    ECHO_SYSTEMS,
    LABELS,
    RPS,
    TINY_OUT,
    TINY_SHAPES,
    cpu_seconds,
    median_of,
    run_driver,
    run_reply,
    run_request,
)

if TYPE_CHECKING:
    from .run_all import Bench

log = logging.getLogger("bench")


def start_servers(bench: Bench, systems: list[str], pkgs: dict[str, Path]) -> list[str]:
    started = []
    # aotiserve first: the echo floors answer with the very bytes it answers a tiny Run with.
    if set(systems) & set(AOTISERVE_SYSTEMS):
        try:
            bench.servers["aotiserve"] = procs.start_aotiserve(
                bench.work / "aotiserve-tiny",
                {"mlp": pkgs["mlp"]},
                runners=bench.args.runners,
                env={"OMP_NUM_THREADS": "1"},
            )
        except (RuntimeError, TimeoutError) as exc:
            bench.note(f"aotiserve: skipped: {exc}")
    daemon = bench.servers.get("aotiserve")
    reply = run_reply(daemon.target if daemon else None, "mlp", TINY_SHAPES, TINY_OUT)
    bench.results["payload_bytes"] = {
        "request": len(run_request("mlp", TINY_SHAPES)),
        "response": len(reply),
        "response_from": "aotiserve" if daemon else "built by the bench",
    }
    for s in systems:
        try:
            if s == "inproc":
                pass
            elif s in ECHO_SYSTEMS:
                bench.servers[s] = procs.start_echo(bench.work / s, reply, cpp=s == "echo_cpp")
            elif s in AOTISERVE_SYSTEMS:
                if daemon is None:
                    raise peers.Skip("the aotiserve daemon did not start")
                if s == "oip" and not procs.oip_model_ready(daemon.target, "mlp"):
                    raise peers.Skip("aotiserve does not serve the Open Inference Protocol")
            elif s in ("kserve", "pytriton"):
                peers.ensure(s, install=not bench.args.no_install)
                bench.servers[s] = peers.start(s, pkgs["mlp"], "mlp", bench.work / s)
            started.append(s)
        except (peers.Skip, RuntimeError, TimeoutError) as exc:
            bench.note(f"{LABELS[s]}: skipped: {exc}")
    return started


def driver_cfg(bench: Bench, system: str, pkgs: dict[str, Path]) -> dict:
    a = bench.args
    cfg = {
        "seq_n": a.seq_n,
        "warmup": a.warmup,
        "concurrency": a.concurrency,
        "duration": a.duration,
        "mode": a.mode,
        "input_shapes": TINY_SHAPES,
        "model": "mlp",
    }
    server = bench.server_of(system)
    if server:  # its sequential latency is measured on a core of its own too (driver.py)
        cfg["server_pids"] = procs.process_tree(server.pid)
    if system == "inproc":
        cfg.update(kind="inproc", package=str(pkgs["mlp"]), num_runners=a.runners or 2)
    elif system in ECHO_SYSTEMS:
        cfg.update(kind="echo", target=bench.servers[system].target)
    elif system in ("run", "client"):
        cfg.update(kind=system, target=bench.servers["aotiserve"].target)
    else:  # Open Inference Protocol: aotiserve, KServe, PyTriton
        cfg.update(kind="oip", target=bench.server_of(system).target)
        if system in ("kserve", "pytriton"):
            cfg.update(input_names=["input__0"])
    return cfg


def sequential_turns(bench: Bench, systems: list[str], pkgs: dict[str, Path]) -> dict[str, dict]:
    """Every system's sequential latency, measured side by side (driver.interleaved: blocks
    of calls, the systems taking turns): ``sequential`` and ``sequential_shared`` per system."""
    a = bench.args
    cfgs = {s: driver_cfg(bench, s, pkgs) for s in systems}
    pids = sorted({p for c in cfgs.values() for p in c.pop("server_pids", [])})
    cfg = {
        "kind": "interleaved",
        "systems": cfgs,
        "seq_n": a.seq_n,
        "block": a.seq_block,
        "warmup": a.warmup,
        "server_pids": pids,
    }
    return run_driver(sys.executable, cfg)["systems"]


def run(bench: Bench, pkgs: dict[str, Path]) -> None:
    systems = start_servers(bench, bench.args.systems, pkgs)
    mem: dict[str, dict] = {}
    # At rest: after start, before any traffic, with every server idle.
    time.sleep(0.5)
    idle_cpu0 = {n: cpu_seconds(s.pid) for n, s in bench.servers.items()}
    t0 = time.monotonic()
    for name, s in bench.servers.items():
        mem[name] = {"at_rest": s.memory()}
    time.sleep(bench.args.idle_probe)
    elapsed = time.monotonic() - t0
    bench.results["idle_cpu_percent"] = {
        n: round(100 * (cpu_seconds(s.pid) - idle_cpu0[n]) / elapsed, 2)
        for n, s in bench.servers.items()
    }
    rounds = []
    for r in range(bench.args.rounds):
        this: dict[str, dict] = {}
        log.info("round %d/%d: sequential latency, taking turns", r + 1, bench.args.rounds)
        try:
            seq = sequential_turns(bench, systems, pkgs)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            bench.note(f"sequential latency, round {r + 1}: {exc}")
            seq = {}
        for system in systems:
            cfg = driver_cfg(bench, system, pkgs) | {"seq_n": 0}  # sequential: above
            server = bench.server_of(system)
            log.info("round %d/%d: %s", r + 1, bench.args.rounds, system)
            try:
                out = bench.measure(system, server, cfg) | seq.get(system, {})
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                bench.note(f"{LABELS[system]} round {r + 1}: {exc}")
                continue
            if server:
                key = "aotiserve" if system in AOTISERVE_SYSTEMS else system
                peak = mem.setdefault(key, {}).setdefault("under_load_peak", {})
                for k, v in out["rss_peak"].items():
                    peak[k] = max(peak.get(k, 0.0), v)
            this[system] = out
            log_line(bench, system, out)
        rounds.append(this)
    for name, s in bench.servers.items():
        mem.setdefault(name, {})["after"] = s.memory()
    bench.stop_all()
    bench.results["tiny"] = {
        "systems": systems,
        "rounds": rounds,
        "summary": summarize(rounds, systems),
    }
    bench.results["memory"] = mem


def log_line(bench: Bench, system: str, out: dict) -> None:
    seq = out.get("sequential", {})
    tp = " ".join(f"c{t['concurrency']}={t[RPS]:.0f}/s" for t in out.get("throughput", []))
    errs = sum(t.get("errors", 0) for t in out.get("throughput", []))
    hot = f"  hot path {100 * out['hot_path_share']:.0f}%" if "hot_path_share" in out else ""
    shared = out.get("sequential_shared", {}).get("p50_us")
    log.info(
        "  %-9s p50=%7.0fus p99=%7.0fus%s  %s  cpu/call server=%s client=%.0fus%s%s",
        system,
        seq.get("p50_us", float("nan")),
        seq.get("p99_us", float("nan")),
        "" if shared is None else f" (sharing cores p50={shared:.0f}us)",
        tp,
        f"{out['server_cpu_us_per_call']:.0f}us" if "server_cpu_us_per_call" in out else "-",
        out.get("client_cpu_us_per_call", float("nan")),
        hot,
        f"  errors={errs}" if errs else "",
    )


def summarize(rounds: list[dict], systems: list[str]) -> dict:
    """Median over rounds of every figure, per system."""
    out: dict = {}
    for s in systems:
        runs = [r[s] for r in rounds if s in r]
        if not runs:
            continue
        seq, shared = (
            {
                k: median_of([r[key][k] for r in runs if key in r])
                for k in ("p50_us", "p90_us", "p99_us", "mean_us")
            }
            for key in ("sequential", "sequential_shared")
        )
        conc = sorted({t["concurrency"] for r in runs for t in r.get("throughput", [])})
        tp = {
            str(c): median_of(
                [t[RPS] for r in runs for t in r.get("throughput", []) if t["concurrency"] == c]
            )
            for c in conc
        }
        tp_mean = {
            str(c): median_of(
                [t["rps"] for r in runs for t in r.get("throughput", []) if t["concurrency"] == c]
            )
            for c in conc
        }
        tp_p50 = {
            str(c): median_of(
                [
                    t["latency"]["p50_us"]
                    for r in runs
                    for t in r.get("throughput", [])
                    if t["concurrency"] == c
                ]
            )
            for c in conc
        }
        errors = sum(t.get("errors", 0) for r in runs for t in r.get("throughput", []))
        cpu_server = median_of([r.get("server_cpu_us_per_call") for r in runs])
        cpu_client = median_of([r.get("client_cpu_us_per_call") for r in runs])
        # What the CPU time per call allows when client and server share every core: a ceiling that
        # stalls from other work on the machine do not move (they move the measured req/s).
        capacity = (
            (os.cpu_count() or 1) * 1e6 / (cpu_server + cpu_client)
            if cpu_server and cpu_client
            else None
        )
        out[s] = {
            "label": LABELS[s],
            "rounds": len(runs),
            "sequential": seq,
            **({"sequential_shared": shared} if shared["p50_us"] is not None else {}),
            "rps": tp,
            "rps_window_mean": tp_mean,
            "cpu_capacity_rps": capacity,
            "p50_us_under_load": tp_p50,
            "errors": errors,
            "server_cpu_us_per_call": cpu_server,
            "client_cpu_us_per_call": cpu_client,
            "hot_path_share": median_of([r.get("hot_path_share") for r in runs]),
        }
    return out
