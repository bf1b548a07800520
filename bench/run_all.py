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
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import peers, procs
from .procs import REPO, Server

log = logging.getLogger("bench")

RESULTS_DIR = REPO / "bench" / "results"
DOCS = REPO / "docs" / "benchmarks.md"
IMG_DIR = REPO / "docs" / "img"

TINY_SYSTEMS = ("inproc", "echo_cpp", "echo", "run", "oip", "client", "kserve", "pytriton")
# Systems served by the one tiny aotiserve daemon.
AOTISERVE_SYSTEMS = ("run", "oip", "client")
ECHO_SYSTEMS = ("echo_cpp", "echo")
WORKLOADS = ("tiny", "compute", "large", "memory")

LABELS = {
    "inproc": "in-process extension call",
    "echo_cpp": "bare gRPC C++ echo (floor)",
    "echo": "bare grpcio echo (floor)",
    "run": "aotiserve Run",
    "oip": "aotiserve OIP ModelInfer",
    "client": "aotiserve Run via aotiserve.client",
    "kserve": "KServe 0.21.0 (OIP ModelInfer)",
    "pytriton": "PyTriton 0.7.0 / Triton 2.51 (OIP ModelInfer)",
}
# The hot-path counter's method label for each aotiserve system.
HOT_METHOD = {"run": "Run", "client": "Run", "oip": "ModelInfer"}
HOT_METRIC = "aotiserve_hot_path_requests_total"
COPIED_METRIC = "aotiserve_port_copied_bytes_total"

TINY_SHAPES = [[1, 64]]
TINY_OUT = [1, 10]

# Throughput figure used in summaries: completions/s in the median 0.25 s slice of each window
# (robust to stalls caused by other work on the machine); the window mean is kept as "rps".
RPS = "rps_median_slice"

LARGE_ROWS = 16384  # [16384, 1024] float32 = 64 MiB
# The large workload's client and echo processes: the huge-page malloc that `aotiserve serve`
# sets for itself (server/process_env.py), so no side pays ~35 ms of page faults per fresh
# 64 MiB buffer that the others don't.
LARGE_ENV = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
MIB = 1 << 20


# --------------------------------------------------------------------------- helpers


def machine_name() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1]
                    break
    except OSError:
        pass
    slug = re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*|\d+-core", "", model.lower())
    slug = re.sub(r"[^a-z0-9]+", "-", slug).strip("-")
    return f"{slug[:32]}-{os.cpu_count()}c"


def machine_info() -> dict:
    info = {"name": machine_name(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
        with open("/proc/meminfo") as f:
            info["mem_total_mib"] = int(f.readline().split()[1]) // 1024
    except (OSError, StopIteration):
        pass
    import grpc
    import torch

    info["torch"] = torch.__version__
    info["grpcio"] = grpc.__version__
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                            text=True).stdout.strip()
        # The bench runs the working tree: say which measured files differ from the commit.
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "server", "runner_ext", "client", "bench"],
                               cwd=REPO, capture_output=True, text=True).stdout.split("\n")
        info["uncommitted"] = [line[3:] for line in dirty if line.strip()]
    except OSError:
        pass
    return info


def packages(names) -> dict[str, Path]:
    sys.path.insert(0, str(REPO / "tests"))
    import model_zoo  # noqa: E402  (the test zoo is the bench's zoo too)

    return {n: model_zoo.compiled(n) for n in names}


def run_request(model: str, shapes: list[list[int]]) -> bytes:
    """The serialized RunRequest the driver sends for ``model`` (the same inputs, bench/driver.py)."""
    from aotiserve.v1 import model_runner_pb2 as pb

    from .driver import _inputs

    return pb.RunRequest(model=model, inputs=[
        pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=a.shape, data=a.tobytes())
        for a in _inputs({"input_shapes": shapes})]).SerializeToString()


def run_reply(target: str | None, model: str, shapes: list[list[int]], out_shape: list[int]) -> bytes:
    """The echo floors' reply: the bytes aotiserve answers this Run with (asked of the daemon at
    ``target``), or, without a daemon, a RunResponse of ``out_shape`` float32 built here."""
    if target:
        import grpc

        from .driver import CHANNEL_OPTIONS, RUN_METHOD

        try:
            with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as ch:
                return ch.unary_unary(RUN_METHOD)(run_request(model, shapes), timeout=120)
        except grpc.RpcError as exc:
            log.warning("Run on %s failed (%s): the echo floors answer a reply built here", target, exc.code())
    from aotiserve.v1 import model_runner_pb2 as pb

    n = 4
    for d in out_shape:
        n *= d
    return pb.RunResponse(outputs=[pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=out_shape, data=bytes(n))],
                          weights_version="initial").SerializeToString()


class RssSampler:
    """Samples a server's memory while a load runs; keeps the maxima."""

    def __init__(self, server: Server | None, period: float = 0.1):
        self.server, self.period = server, period
        self.peak: dict = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            m = self.server.memory()
            for k in ("rss_mib", "tree_rss_mib"):
                self.peak[k] = max(self.peak.get(k, 0.0), m[k])
            self._stop.wait(self.period)

    def __enter__(self):
        if self.server:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.server:
            self._thread.join()


def run_driver(python: Path | str, cfg: dict, timeout: float = 900, env: dict | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(env or {}))
    proc = subprocess.run([str(python), str(REPO / "bench" / "driver.py"), json.dumps(cfg)], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=str(REPO))
    if proc.returncode != 0:
        raise RuntimeError(f"driver for {cfg['kind']} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["loadavg_1m_after"] = os.getloadavg()[0]  # others' work on the same cores shows here
    return out


def _gbps_round_trip(nbytes: int, res: dict) -> float:
    """GB/s of ``nbytes`` in and ``nbytes`` out per sequential p50 call of a driver result."""
    return 2 * nbytes / (res["sequential"]["p50_us"] / 1e6) / 1e9


def memcpy_rates(nbytes: int) -> dict:
    """What one copy of the payload costs on this machine now (best of 3): into a touched buffer
    (memory bandwidth alone) and into a fresh one (as ``bytes``/``tobytes`` do: page faults too)."""
    import numpy as np

    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, dtype=np.uint8)
    warm, fresh = [], []
    for _ in range(3):
        t = time.perf_counter()
        np.copyto(dst, src)
        warm.append(time.perf_counter() - t)
        t = time.perf_counter()
        b = src.tobytes()
        fresh.append(time.perf_counter() - t)
        del b
    return {"touched_gbps": nbytes / min(warm) / 1e9, "fresh_gbps": nbytes / min(fresh) / 1e9,
            "fresh_ms_per_copy": 1e3 * min(fresh)}


def cpu_seconds(pid: int) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in procs.process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError):
            pass
    return total


def median_of(values):
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


# --------------------------------------------------------------------------- the run


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.notes: list[str] = []
        self.servers: dict[str, Server] = {}
        self.work = procs.tmpdir("aotiserve-bench-")
        self.results: dict = {"notes": self.notes}

    def note(self, msg: str) -> None:
        log.warning("%s", msg)
        self.notes.append(msg)

    # ----------------------------------------------------------------- servers

    def start_tiny_servers(self, systems: list[str], pkgs: dict[str, Path]) -> list[str]:
        started = []
        # aotiserve first: the echo floors answer with the very bytes it answers a tiny Run with.
        if set(systems) & set(AOTISERVE_SYSTEMS):
            try:
                self.servers["aotiserve"] = procs.start_aotiserve(
                    self.work / "aotiserve-tiny", {"mlp": pkgs["mlp"]}, runners=self.args.runners,
                    env={"OMP_NUM_THREADS": "1"})
            except (RuntimeError, TimeoutError) as exc:
                self.note(f"aotiserve: skipped: {exc}")
        daemon = self.servers.get("aotiserve")
        reply = run_reply(daemon.target if daemon else None, "mlp", TINY_SHAPES, TINY_OUT)
        self.results["payload_bytes"] = {"request": len(run_request("mlp", TINY_SHAPES)), "response": len(reply),
                                         "response_from": "aotiserve" if daemon else "built by the bench"}
        for s in systems:
            try:
                if s == "inproc":
                    pass
                elif s in ECHO_SYSTEMS:
                    self.servers[s] = procs.start_echo(self.work / s, reply, cpp=s == "echo_cpp")
                elif s in AOTISERVE_SYSTEMS:
                    if daemon is None:
                        raise peers.Skip("the aotiserve daemon did not start")
                    if s == "oip" and not procs.oip_model_ready(daemon.target, "mlp"):
                        raise peers.Skip("aotiserve does not serve the Open Inference Protocol")
                elif s in ("kserve", "pytriton"):
                    peers.ensure(s, install=not self.args.no_install)
                    self.servers[s] = peers.start(s, pkgs["mlp"], "mlp", self.work / s)
                started.append(s)
            except (peers.Skip, RuntimeError, TimeoutError) as exc:
                self.note(f"{LABELS[s]}: skipped: {exc}")
        return started

    def server_of(self, system: str) -> Server | None:
        return self.servers.get("aotiserve" if system in AOTISERVE_SYSTEMS else system)

    def stop_all(self) -> None:
        for s in list(self.servers.values()):
            s.stop()
        self.servers.clear()

    # ----------------------------------------------------------------- tiny

    def tiny_cfg(self, system: str, pkgs: dict[str, Path]) -> dict:
        a = self.args
        cfg = {
            "seq_n": a.seq_n, "warmup": a.warmup, "concurrency": a.concurrency,
            "duration": a.duration, "mode": a.mode, "input_shapes": TINY_SHAPES, "model": "mlp",
        }
        if system == "inproc":
            cfg.update(kind="inproc", package=str(pkgs["mlp"]), num_runners=a.runners or 2)
        elif system in ECHO_SYSTEMS:
            cfg.update(kind="echo", target=self.servers[system].target)
        elif system in ("run", "client"):
            cfg.update(kind=system, target=self.servers["aotiserve"].target)
        else:  # Open Inference Protocol: aotiserve, KServe, PyTriton
            cfg.update(kind="oip", target=self.server_of(system).target)
            if system in ("kserve", "pytriton"):
                cfg.update(input_names=["input__0"])
        return cfg

    def measure(self, system: str, server: Server | None, cfg: dict, env: dict | None = None,
                sampler: bool = True) -> dict:
        """One driver run against ``server``: adds the server's CPU per call and, for aotiserve,
        the share of the calls its C++ hot path answered (from its own counter)."""
        hot = HOT_METHOD.get(system)
        hot0 = procs.metric(server, HOT_METRIC, {"method": hot}) if hot and server else None
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
            out["hot_path_share"] = (procs.metric(server, HOT_METRIC, {"method": hot}) - hot0) / calls
        return out

    def tiny(self, pkgs: dict[str, Path]) -> None:
        systems = self.start_tiny_servers(self.args.systems, pkgs)
        mem: dict[str, dict] = {}
        # At rest: after start, before any traffic, with every server idle.
        time.sleep(0.5)
        idle_cpu0 = {n: cpu_seconds(s.pid) for n, s in self.servers.items()}
        t0 = time.monotonic()
        for name, s in self.servers.items():
            mem[name] = {"at_rest": s.memory()}
        time.sleep(self.args.idle_probe)
        elapsed = time.monotonic() - t0
        self.results["idle_cpu_percent"] = {
            n: round(100 * (cpu_seconds(s.pid) - idle_cpu0[n]) / elapsed, 2) for n, s in self.servers.items()}
        rounds = []
        for r in range(self.args.rounds):
            this: dict[str, dict] = {}
            for system in systems:
                cfg = self.tiny_cfg(system, pkgs)
                server = self.server_of(system)
                log.info("round %d/%d: %s", r + 1, self.args.rounds, system)
                try:
                    out = self.measure(system, server, cfg)
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    self.note(f"{LABELS[system]} round {r + 1}: {exc}")
                    continue
                if server:
                    key = "aotiserve" if system in AOTISERVE_SYSTEMS else system
                    peak = mem.setdefault(key, {}).setdefault("under_load_peak", {})
                    for k, v in out["rss_peak"].items():
                        peak[k] = max(peak.get(k, 0.0), v)
                this[system] = out
                self.log_line(system, out)
            rounds.append(this)
        for name, s in self.servers.items():
            mem.setdefault(name, {})["after"] = s.memory()
        self.stop_all()
        self.results["tiny"] = {"systems": systems, "rounds": rounds, "summary": summarize_tiny(rounds, systems)}
        self.results["memory"] = mem

    def log_line(self, system: str, out: dict) -> None:
        seq = out.get("sequential", {})
        tp = " ".join(f"c{t['concurrency']}={t[RPS]:.0f}/s" for t in out.get("throughput", []))
        errs = sum(t.get("errors", 0) for t in out.get("throughput", []))
        hot = f"  hot path {100 * out['hot_path_share']:.0f}%" if "hot_path_share" in out else ""
        log.info("  %-9s p50=%7.0fus p99=%7.0fus  %s  cpu/call server=%s client=%.0fus%s%s", system,
                 seq.get("p50_us", float("nan")), seq.get("p99_us", float("nan")), tp,
                 f"{out['server_cpu_us_per_call']:.0f}us" if "server_cpu_us_per_call" in out else "-",
                 out.get("client_cpu_us_per_call", float("nan")), hot, f"  errors={errs}" if errs else "")

    # ----------------------------------------------------------------- compute + large

    def heavy(self, pkgs: dict[str, Path], workloads: set[str]) -> None:
        """One daemon with 2 runners per model and OMP_NUM_THREADS=1 for compute and large."""
        runners = 2
        env = {"OMP_NUM_THREADS": "1"}
        max_msg = 160 * MIB
        models = {n: pkgs[n] for n in ("compute", "passthrough") if n in pkgs}
        try:
            server = procs.start_aotiserve(self.work / "aotiserve-heavy", models, runners=runners, env=env,
                                           extra_args=["--max-message-bytes", str(max_msg)])
        except (RuntimeError, TimeoutError) as exc:
            self.note(f"aotiserve (compute/large daemon): skipped: {exc}")
            return
        settings = {"runners_per_model": runners, "OMP_NUM_THREADS": 1, "max_message_bytes": max_msg}
        try:
            if "large" in workloads:
                self.results["large"] = self.large(server) | {"server_settings": settings}
            if "compute" in workloads:
                self.results["compute"] = self.compute(server, pkgs) | {"server_settings": settings}
        finally:
            server.stop()

    def large(self, server: Server) -> dict:
        """64 MiB in, 64 MiB out: Run on the daemon's port (and through aotiserve.client), and the
        same RunRequest/RunResponse bytes through both echo floors. Every process of it (clients,
        echo servers) runs with the huge-page malloc setting ``aotiserve serve`` gives itself."""
        a = self.args
        shapes = [[LARGE_ROWS, 1024]]
        nbytes = LARGE_ROWS * 1024 * 4
        out: dict = {"payload_mib": nbytes / MIB, "memory_before": server.memory(),
                     "memcpy": memcpy_rates(nbytes), "process_env": LARGE_ENV}
        cfg = {"kind": "run", "target": server.target, "model": "passthrough", "input_shapes": shapes,
               "seq_n": a.large_n, "warmup": 1}
        # The daemon's peak over these calls (VmHWM reset first): the payloads it held at once.
        procs.reset_peak_memory(server.pid)
        before, copied = server.memory(), procs.metric(server, COPIED_METRIC)
        res = self.measure("run", server, cfg, env=LARGE_ENV, sampler=False)
        growth = server.memory()["hwm_mib"] - before["rss_mib"]
        out["run"] = res["sequential"] | {
            "gbps_round_trip": _gbps_round_trip(nbytes, res),
            "peak_growth_mib": growth,
            "payloads_held_at_peak": round(growth / (nbytes / MIB), 2),
            "hot_path_share": res.get("hot_path_share"),
            "server_cpu_us_per_call": res.get("server_cpu_us_per_call")}
        if copied is not None:
            # The port counts the payload bytes it copies: per request, in payloads of 64 MiB.
            done = procs.metric(server, COPIED_METRIC)
            out["run"]["port_copies_per_request"] = round((done - copied) / res["calls_total"] / nbytes, 3)
        if "client" in self.args.systems:  # aotiserve's own client library on the same port
            try:
                c = run_driver(sys.executable, dict(cfg, kind="client"), env=LARGE_ENV)
                out["client"] = c["sequential"] | {"gbps_round_trip": _gbps_round_trip(nbytes, c)}
            except RuntimeError as exc:
                self.note(f"64 MiB through aotiserve.client: {exc}")
        out["gbps_round_trip"] = out["run"]["gbps_round_trip"]
        # The same bytes through the bare echo floors: what each transport alone allows here.
        reply = run_reply(server.target, "passthrough", shapes, shapes[0])
        for key in ECHO_SYSTEMS:
            if key not in self.args.systems:
                continue
            try:
                echo = procs.start_echo(self.work / f"{key}-large", reply, cpp=key == "echo_cpp",
                                        workers=None if key == "echo_cpp" else 2, env=LARGE_ENV)
            except (RuntimeError, TimeoutError) as exc:
                self.note(f"64 MiB through {LABELS[key]}: skipped: {exc}")
                continue
            try:
                e = run_driver(sys.executable, dict(cfg, kind="echo", target=echo.target), env=LARGE_ENV)
                out[key] = e["sequential"] | {"gbps_round_trip": _gbps_round_trip(nbytes, e)}
            finally:
                echo.stop()
        del reply
        log.info("  large: Run %.2f GB/s round trip (%s)", out["gbps_round_trip"], ", ".join(
            f"{k} {out[k]['gbps_round_trip']:.2f} GB/s" for k in ("client", *ECHO_SYSTEMS) if k in out))
        return out

    def compute(self, server: Server, pkgs: dict[str, Path]) -> dict:
        a = self.args
        out: dict = {}
        cfg = {"kind": "run", "target": server.target, "model": "compute", "input_shapes": [[64, 1024]],
               "seq_n": a.compute_seq_n, "warmup": 5, "concurrency": [1, 2] * a.compute_alternations,
               "duration": a.duration, "mode": "threads"}
        runs = []
        for r in range(a.rounds):
            run = {"aotiserve": self.measure("run", server, cfg, sampler=False),
                   "inproc": run_driver(sys.executable, dict(cfg, kind="inproc", package=str(pkgs["compute"]),
                                                             num_runners=2))}
            runs.append(run)
            log.info("  compute round %d: " + "; ".join(
                f"{who} 1c=%.1f/s 2c=%.1f/s (x%.2f)" for who in run), r + 1,
                *[x for who in run for x in (_rps(run[who], 1), _rps(run[who], 2),
                                             _rps(run[who], 2) / _rps(run[who], 1))])
        out["rounds"] = runs
        med = lambda who, c: median_of([_rps(run[who], c) for run in runs])  # noqa: E731
        for who in runs[0]:
            out[f"{who}_rps"] = {"1": med(who, 1), "2": med(who, 2)}
            out[f"{who}_scaling_2_over_1"] = median_of([_rps(run[who], 2) / _rps(run[who], 1) for run in runs])
        out["hot_path_share"] = median_of([run["aotiserve"].get("hot_path_share") for run in runs])
        out["client_mode"] = "threads (grpc releases the GIL while waiting; the client's work per call is small)"
        return out

    # ----------------------------------------------------------------- all

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
                self.tiny(pkgs)
            if {"compute", "large"} & set(a.workloads):
                self.heavy(pkgs, set(a.workloads))
        finally:
            self.stop_all()
            shutil.rmtree(self.work, ignore_errors=True)
        self.results["ratios"] = ratios(self.results)
        self.results["meta"]["wall_s"] = round(time.time() - started, 1)
        self.results["meta"]["loadavg_end"] = os.getloadavg()
        return self.results


def _rps(result: dict, c: int) -> float:
    """Median req/s over the windows run with ``c`` clients (compute alternates 1, 2, 1, 2...)."""
    return statistics.median(t[RPS] for t in result["throughput"] if t["concurrency"] == c)


def summarize_tiny(rounds: list[dict], systems: list[str]) -> dict:
    """Median over rounds of every figure, per system."""
    out: dict = {}
    for s in systems:
        runs = [r[s] for r in rounds if s in r]
        if not runs:
            continue
        seq = {k: median_of([r["sequential"][k] for r in runs if "sequential" in r])
               for k in ("p50_us", "p90_us", "p99_us", "mean_us")}
        conc = sorted({t["concurrency"] for r in runs for t in r.get("throughput", [])})
        tp = {str(c): median_of([t[RPS] for r in runs for t in r.get("throughput", []) if t["concurrency"] == c])
              for c in conc}
        tp_mean = {str(c): median_of([t["rps"] for r in runs for t in r.get("throughput", [])
                                      if t["concurrency"] == c]) for c in conc}
        tp_p50 = {str(c): median_of([t["latency"]["p50_us"] for r in runs for t in r.get("throughput", [])
                                     if t["concurrency"] == c]) for c in conc}
        errors = sum(t.get("errors", 0) for r in runs for t in r.get("throughput", []))
        cpu_server = median_of([r.get("server_cpu_us_per_call") for r in runs])
        cpu_client = median_of([r.get("client_cpu_us_per_call") for r in runs])
        # What the CPU time per call allows when client and server share every core: a ceiling that
        # stalls from other work on the machine do not move (they move the measured req/s).
        capacity = (os.cpu_count() or 1) * 1e6 / (cpu_server + cpu_client) if cpu_server and cpu_client else None
        out[s] = {"label": LABELS[s], "rounds": len(runs), "sequential": seq, "rps": tp, "rps_window_mean": tp_mean,
                  "cpu_capacity_rps": capacity,
                  "p50_us_under_load": tp_p50, "errors": errors,
                  "server_cpu_us_per_call": cpu_server, "client_cpu_us_per_call": cpu_client,
                  "hot_path_share": median_of([r.get("hot_path_share") for r in runs])}
    return out


# Issue 16's CPU acceptance criteria: key -> (comparison, target, label).
TARGETS = {
    "run_p50_over_echo_cpp_p50": ("<=", 1.15, "Tiny p50: aotiserve Run ÷ gRPC C++ echo floor"),
    "run_p50_over_echo_p50": ("<=", 0.75, "Tiny p50: aotiserve Run ÷ grpcio echo floor"),
    "run_rps8_over_echo_cpp": (">=", 0.85, "8 clients req/s: aotiserve Run ÷ gRPC C++ echo floor"),
    "run_rps8_over_echo": (">=", 1.5, "8 clients req/s: aotiserve Run ÷ grpcio echo floor"),
    "run_rps8_over_kserve": (">=", 3.0, "8 clients req/s: aotiserve Run ÷ KServe 0.21"),
    "run_rps8_over_pytriton": (">=", 8.0, "8 clients req/s: aotiserve Run ÷ PyTriton"),
    "oip_p50_over_run_p50": ("<=", 1.10, "Tiny p50: aotiserve OIP ModelInfer ÷ Run"),
    "oip_rps8_over_run": (">=", 0.90, "8 clients req/s: aotiserve OIP ModelInfer ÷ Run"),
    "compute_scaling_2_over_1": (">=", 1.75, "Compute-bound: 2 clients ÷ 1 client req/s"),
    "large_gbps_round_trip": (">=", 1.5, "64 MiB round trip, GB/s (in+out bytes ÷ p50)"),
}
# Measured alongside, no target: key -> label.
INFO = {
    "echo_cpp_p50_over_echo_p50": "Tiny p50: gRPC C++ echo ÷ grpcio echo",
    "echo_cpp_rps8_over_echo": "8 clients req/s: gRPC C++ echo ÷ grpcio echo",
    "run_p50_over_kserve_p50": "Tiny p50: aotiserve Run ÷ KServe",
    "run_p50_over_pytriton_p50": "Tiny p50: aotiserve Run ÷ PyTriton",
    "oip_rps8_over_kserve": "8 clients req/s: aotiserve OIP ÷ KServe (same protocol)",
    "client_p50_over_run_p50": "Tiny p50: aotiserve.client ÷ the bare grpcio stub",
    "client_rps8_over_run": "8 clients req/s: aotiserve.client ÷ the bare grpcio stub",
    "run_cpu_capacity_over_echo_cpp": "CPU-bound capacity: aotiserve Run ÷ gRPC C++ echo",
    "run_cpu_capacity_over_echo": "CPU-bound capacity: aotiserve Run ÷ grpcio echo",
    "run_cpu_capacity_over_kserve": "CPU-bound capacity: aotiserve Run ÷ KServe",
    "run_hot_path_share": "Tiny Run calls answered by the C++ hot path (share)",
    "oip_hot_path_share": "Tiny ModelInfer calls answered by the C++ hot path (share)",
    "compute_inproc_scaling_2_over_1": "Compute-bound in-process, 2 threads ÷ 1 (what the cores gave)",
    "large_port_copies_per_request": "64 MiB: payload copies the port made per request",
    "large_echo_cpp_gbps_round_trip": "64 MiB round trip through the gRPC C++ echo, GB/s",
    "large_echo_gbps_round_trip": "64 MiB round trip through the grpcio echo, GB/s",
    "large_client_gbps_round_trip": "64 MiB round trip, aotiserve.client, GB/s",
}


def ratios(results: dict) -> dict:
    s = results.get("tiny", {}).get("summary", {})

    def p50(x):
        return s.get(x, {}).get("sequential", {}).get("p50_us")

    def rps8(x):
        return s.get(x, {}).get("rps", {}).get("8")

    def div(a, b):
        return a / b if a is not None and b else None

    def cap(x):
        return s.get(x, {}).get("cpu_capacity_rps")

    large = results.get("large", {})
    compute = results.get("compute", {})
    r = {
        "run_p50_over_echo_cpp_p50": div(p50("run"), p50("echo_cpp")),
        "run_p50_over_echo_p50": div(p50("run"), p50("echo")),
        "run_rps8_over_echo_cpp": div(rps8("run"), rps8("echo_cpp")),
        "run_rps8_over_echo": div(rps8("run"), rps8("echo")),
        "run_rps8_over_kserve": div(rps8("run"), rps8("kserve")),
        "run_rps8_over_pytriton": div(rps8("run"), rps8("pytriton")),
        "oip_p50_over_run_p50": div(p50("oip"), p50("run")),
        "oip_rps8_over_run": div(rps8("oip"), rps8("run")),
        "compute_scaling_2_over_1": compute.get("aotiserve_scaling_2_over_1"),
        "large_gbps_round_trip": large.get("gbps_round_trip"),
        "echo_cpp_p50_over_echo_p50": div(p50("echo_cpp"), p50("echo")),
        "echo_cpp_rps8_over_echo": div(rps8("echo_cpp"), rps8("echo")),
        "run_p50_over_kserve_p50": div(p50("run"), p50("kserve")),
        "run_p50_over_pytriton_p50": div(p50("run"), p50("pytriton")),
        "oip_rps8_over_kserve": div(rps8("oip"), rps8("kserve")),
        "client_p50_over_run_p50": div(p50("client"), p50("run")),
        "client_rps8_over_run": div(rps8("client"), rps8("run")),
        "run_cpu_capacity_over_echo_cpp": div(cap("run"), cap("echo_cpp")),
        "run_cpu_capacity_over_echo": div(cap("run"), cap("echo")),
        "run_cpu_capacity_over_kserve": div(cap("run"), cap("kserve")),
        "run_hot_path_share": s.get("run", {}).get("hot_path_share"),
        "oip_hot_path_share": s.get("oip", {}).get("hot_path_share"),
        "compute_inproc_scaling_2_over_1": compute.get("inproc_scaling_2_over_1"),
        "large_port_copies_per_request": large.get("run", {}).get("port_copies_per_request"),
        "large_echo_cpp_gbps_round_trip": large.get("echo_cpp", {}).get("gbps_round_trip"),
        "large_echo_gbps_round_trip": large.get("echo", {}).get("gbps_round_trip"),
        "large_client_gbps_round_trip": large.get("client", {}).get("gbps_round_trip"),
    }
    r["acceptance"] = {
        k: {"value": r[k], "target": f"{op} {t}", "label": label,
            "met": None if r[k] is None else (r[k] <= t if op == "<=" else r[k] >= t)}
        for k, (op, t, label) in TARGETS.items()
    }
    return r


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help=f"comma list of {', '.join(WORKLOADS)} (default: all)")
    ap.add_argument("--systems", default=",".join(TINY_SYSTEMS),
                    help=f"comma list of {', '.join(TINY_SYSTEMS)} (default: all that can run)")
    ap.add_argument("--no-peers", action="store_true", help="leave out KServe and PyTriton")
    ap.add_argument("--no-install", action="store_true", help="skip peers that are not installed yet")
    ap.add_argument("--quick", action="store_true", help="a few-second smoke run (1 round, short windows)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies every duration and call count")
    ap.add_argument("--rounds", type=int, default=5,
                    help="round-robin rounds over the systems; figures are medians over rounds")
    ap.add_argument("--concurrency", default="1,4,8,16", help="client counts for throughput")
    ap.add_argument("--mode", choices=("threads", "procs"), default="threads",
                    help="concurrent clients as threads of one client process, or as processes")
    ap.add_argument("--runners", type=int, default=None,
                    help="--runners-per-model for the tiny daemon (default: the daemon's own default)")
    ap.add_argument("--out", default=None, help="results JSON path (default bench/results/<date>-<machine>.json)")
    ap.add_argument("--docs", default=None, help="markdown report path (default docs/benchmarks.md; 'none' to skip)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--report-only", metavar="JSON",
                    help="measure nothing: rewrite the report and plots from an earlier results file")
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
        a.large_n, a.compute_seq_n, a.compute_alternations = 2, 5, 1
    else:
        a.seq_n, a.warmup, a.duration = max(50, int(1000 * sc)), max(20, int(200 * sc)), max(0.3, 2.0 * sc)
        a.large_n, a.compute_seq_n = max(2, int(10 * sc)), max(5, int(30 * sc))
        a.compute_alternations = 3  # 1, 2, 1, 2, 1, 2 clients: drift in others' load hits both alike
    a.idle_probe = 0.5 if a.quick else 2.0
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from . import report  # matplotlib is needed only here

    if args.report_only:
        out = Path(args.report_only)
        results = json.loads(out.read_text())
        if "tiny" in results:  # summaries are recomputed from the raw rounds
            results["tiny"]["summary"] = summarize_tiny(results["tiny"]["rounds"], results["tiny"]["systems"])
        results["ratios"] = ratios(results)
        docs = Path(args.docs) if args.docs and args.docs != "none" else DOCS
        docs.parent.mkdir(parents=True, exist_ok=True)
        plots = [] if args.no_plots else report.plots(results, docs.parent / "img")
        docs.write_text(report.markdown(results, out, plots, docs.parent))
        print(report.summary_table(results))
        return 0
    results = Bench(args).run()
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    # A --quick smoke run is not a result worth keeping: it goes to a temporary folder unless --out says.
    if args.out:
        out = Path(args.out)
    elif args.quick:
        out = Path(tempfile.mkdtemp(prefix="aotiserve-bench-quick-")) / f"{stamp}-{machine_name()}-quick.json"
    else:
        out = RESULTS_DIR / f"{stamp}-{machine_name()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=float) + "\n")
    log.info("results: %s", out)
    docs = None if args.docs == "none" else Path(args.docs) if args.docs else (None if args.quick else DOCS)
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
