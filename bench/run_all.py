"""The side-by-side benchmark: ``make bench`` (or ``python -m bench.run_all``).

Measures, in one run on this machine, the same tiny AOTI MLP ([1,64] float32
in, [1,10] out) served by: the extension called in-process, a bare grpcio echo
server (the floor for any Python grpcio server, same payload sizes), aotiserve's
native Run (raw stubs and the client library), aotiserve's Open Inference
Protocol endpoint, KServe 0.21 and PyTriton 0.7. Then a compute-bound model on
aotiserve (1 vs 2 clients), a 64 MiB round trip, and daemon memory.

Every client is a separate process from its server. All servers of the tiny
workload are up together and measured round-robin for ``--rounds`` rounds;
the report gives the median over rounds. Results go to
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

TINY_SYSTEMS = ("inproc", "echo", "echo_aio", "native", "fast", "client", "oip", "kserve", "pytriton")
# Systems served by the one tiny aotiserve daemon (its main port, or the native data port: fast).
AOTISERVE_SYSTEMS = ("native", "fast", "client", "oip")
WORKLOADS = ("tiny", "profile", "ladder", "compute", "large", "memory")
LADDER = {  # name -> the layers of bench/ladder_server.py it runs
    "bare": ("bare",),
    "interceptor": ("bare", "interceptor"),
    "torch": ("bare", "interceptor", "torch"),
    "proto": ("bare", "interceptor", "torch", "proto"),
    "fastcodec": ("bare", "interceptor", "torch", "fastcodec"),
    "fast_model": ("bare", "interceptor", "torch", "fastcodec", "model"),
    "model_gil": ("bare", "interceptor", "torch", "proto", "model_gil"),
    "model": ("bare", "interceptor", "torch", "proto", "model"),
    "trailer": ("bare", "interceptor", "torch", "proto", "model", "trailer"),
    "metrics": ("bare", "interceptor", "torch", "proto", "model", "trailer", "metrics"),
}
LADDER_LABELS = {
    "bare": "bare grpcio echo (the floor)",
    "interceptor": "+ a pass-through ServerInterceptor",
    "torch": "+ `import torch` in the server (nothing else)",
    "proto": "+ generated-protobuf parse, tensor_codec decode/encode, RunResponse",
    "fastcodec": "… instead: hand-written RunRequest parser / RunResponse writer (bench/copies.py)",
    "fast_model": "… hand-written codec + the model runs (runner_ext)",
    "model_gil": "+ the model runs, torch's own binding (holds the GIL)",
    "model": "+ the model runs, runner_ext (GIL released; instead of the row above)",
    "trailer": "+ trailing metadata (weights version)",
    "metrics": "+ aotiserve's 7 Prometheus updates per Run",
}

LABELS = {
    "inproc": "in-process extension call",
    "echo": "bare grpcio echo (floor)",
    "echo_aio": "bare grpc.aio echo (for comparison)",
    "native": "aotiserve native Run (raw stub)",
    "fast": "aotiserve native Run, native data port (raw stub)",
    "client": "aotiserve native Run (aotiserve.client)",
    "oip": "aotiserve OIP ModelInfer (tritonclient)",
    "kserve": "KServe 0.21.0 (tritonclient)",
    "pytriton": "PyTriton 0.7.0 / Triton 2.51 (tritonclient)",
}

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


def payload_sizes() -> tuple[int, int]:
    """Serialized sizes of the native tiny request/response: the echo server uses the same."""
    from aotiserve.v1 import model_runner_pb2 as pb

    req = pb.RunRequest(model="mlp", inputs=[pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[1, 64], data=b"\0" * 256)])
    resp = pb.RunResponse(outputs=[pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[1, 10], data=b"\0" * 40)],
                          weights_version="initial")
    return req.ByteSize(), resp.ByteSize()


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
        req_size, resp_size = payload_sizes()
        self.results["payload_bytes"] = {"request": req_size, "response": resp_size}
        started = []
        for s in systems:
            if s == "inproc":
                started.append(s)
                continue
            try:
                if s == "echo":
                    self.servers[s] = procs.start_echo(self.work / "echo", resp_size, workers=8)
                elif s == "echo_aio":
                    self.servers[s] = procs.start_echo(self.work / "echo_aio", resp_size, aio=True)
                elif s in AOTISERVE_SYSTEMS:
                    if "aotiserve" not in self.servers:
                        from aotiserve import runner_ext

                        # The native data port too, where the extension has it (opt-in in the daemon).
                        fast = ["--native-run-port", "0"] if runner_ext.native_run_available() else []
                        self.servers["aotiserve"] = procs.start_aotiserve(
                            self.work / "aotiserve-tiny", {"mlp": pkgs["mlp"]}, runners=self.args.runners,
                            env={"OMP_NUM_THREADS": "1"}, extra_args=fast)
                    if s == "fast" and not self.servers["aotiserve"].extra["ready"].get("native_run_port"):
                        raise peers.Skip("this build of aotiserve.runner_ext has no native data port "
                                         "(gRPC C++ was not found at build time)")
                    if s == "oip" and not procs.oip_model_ready(self.servers["aotiserve"].target, "mlp"):
                        raise peers.Skip("aotiserve does not serve the Open Inference Protocol yet")
                    if s == "client":
                        import aotiserve.client as c
                        if not hasattr(c, "Client"):
                            raise peers.Skip("aotiserve.client.Client does not exist yet")
                elif s in ("kserve", "pytriton"):
                    peers.ensure(s, install=not self.args.no_install)
                    self.servers[s] = peers.start(s, pkgs["mlp"], "mlp", self.work / s)
                if s in ("oip", "kserve", "pytriton"):
                    peers.ensure("oipclient", install=not self.args.no_install)
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

    def tiny_cfg(self, system: str, pkgs: dict[str, Path]) -> tuple[Path | str, dict]:
        a = self.args
        cfg = {
            "seq_n": a.seq_n, "warmup": a.warmup, "concurrency": a.concurrency,
            "duration": a.duration, "mode": a.mode, "input_shapes": [[1, 64]], "model": "mlp",
        }
        req_size, _ = payload_sizes()
        python: Path | str = sys.executable
        if system == "inproc":
            cfg.update(kind="inproc", package=str(pkgs["mlp"]), num_runners=a.runners or 2)
        elif system in ("echo", "echo_aio"):
            cfg.update(kind="echo", target=self.servers[system].target, req_size=req_size, runrequest=True)
        elif system in ("native", "client"):
            cfg.update(kind=system, target=self.servers["aotiserve"].target)
        elif system == "fast":
            port = self.servers["aotiserve"].extra["ready"]["native_run_port"]
            cfg.update(kind="native", target=f"127.0.0.1:{port}")
        else:
            python = peers.venv_python("oipclient")
            target = self.server_of(system).target
            cfg.update(kind="oip", target=target)
            if system in ("kserve", "pytriton"):
                cfg.update(input_names=["input__0"], output_names=["output__0"])
        return python, cfg

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
                python, cfg = self.tiny_cfg(system, pkgs)
                server = self.server_of(system)
                log.info("round %d/%d: %s", r + 1, self.args.rounds, system)
                try:
                    cpu0 = cpu_seconds(server.pid) if server else 0.0
                    with RssSampler(server) as sampler:
                        out = run_driver(python, cfg)
                    if server and out.get("calls_total"):
                        out["server_cpu_us_per_call"] = 1e6 * (cpu_seconds(server.pid) - cpu0) / out["calls_total"]
                    if out.get("calls_total"):
                        out["client_cpu_us_per_call"] = 1e6 * out["client_cpu_s"] / out["calls_total"]
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    self.note(f"{LABELS[system]} round {r + 1}: {exc}")
                    continue
                if server:
                    key = "aotiserve" if system in AOTISERVE_SYSTEMS else system
                    peak = mem.setdefault(key, {}).setdefault("under_load_peak", {})
                    for k, v in sampler.peak.items():
                        peak[k] = max(peak.get(k, 0.0), v)
                this[system] = out
                self.log_line(system, out)
            rounds.append(this)
        for name, s in self.servers.items():
            mem.setdefault(name, {})["after"] = s.memory()
        if "profile" in self.args.workloads and "aotiserve" in self.servers:
            self.profile(pkgs)
        self.stop_all()
        self.results["tiny"] = {"systems": systems, "rounds": rounds, "summary": summarize_tiny(rounds, systems)}
        self.results["memory"] = mem

    def profile(self, pkgs: dict[str, Path]) -> None:
        """py-spy on the tiny daemon: GIL µs per native Run, by function and by area."""
        from . import hotpath

        python, cfg = self.tiny_cfg("native", pkgs)
        out = {}
        for clients in (1, 8):
            try:
                out[str(clients)] = hotpath.profile_daemon(
                    self.servers["aotiserve"], run_driver, dict(cfg, profile_clients=clients),
                    self.args.profile_s, self.work)
            except (RuntimeError, subprocess.SubprocessError, ValueError) as exc:
                self.note(f"profile ({clients} clients): {exc}")
                continue
            p = out[str(clients)]
            log.info("  profile %d client(s): %.0f us of GIL time per request; %s", clients,
                     p["gil_us_per_request"], ", ".join(f"{k} {v:.0f}" for k, v in
                                                       p["areas_self_us_per_request"].items()))
        if out:
            self.results["profile"] = out

    def log_line(self, system: str, out: dict) -> None:
        seq = out.get("sequential", {})
        tp = " ".join(f"c{t['concurrency']}={t[RPS]:.0f}/s" for t in out.get("throughput", []))
        errs = sum(t.get("errors", 0) for t in out.get("throughput", []))
        log.info("  %-9s p50=%7.0fus p99=%7.0fus  %s  cpu/call server=%s client=%.0fus%s", system,
                 seq.get("p50_us", float("nan")), seq.get("p99_us", float("nan")), tp,
                 f"{out['server_cpu_us_per_call']:.0f}us" if "server_cpu_us_per_call" in out else "-",
                 out.get("client_cpu_us_per_call", float("nan")), f"  errors={errs}" if errs else "")

    # ----------------------------------------------------------------- ladder

    def ladder(self, pkgs: dict[str, Path]) -> None:
        """The echo floor with aotiserve's per-request layers added one by one (bench/ladder_server.py)."""
        _, resp_size = payload_sizes()
        servers: dict[str, Server] = {}
        try:
            for layer, layers in LADDER.items():
                servers[layer] = procs.start_ladder(self.work / f"ladder-{layer}", list(layers), pkgs["mlp"],
                                                    resp_size)
            runs: dict[str, list] = {k: [] for k in LADDER}
            for r in range(self.args.rounds):
                for layer, server in servers.items():
                    cfg = {"kind": "echo", "target": server.target, "runrequest": True, "model": "mlp",
                           "input_shapes": [[1, 64]], "seq_n": self.args.seq_n, "warmup": self.args.warmup,
                           "concurrency": [8], "duration": self.args.duration, "mode": self.args.mode}
                    cpu0 = cpu_seconds(server.pid)
                    out = run_driver(sys.executable, cfg)
                    out["server_cpu_us_per_call"] = 1e6 * (cpu_seconds(server.pid) - cpu0) / out["calls_total"]
                    runs[layer].append(out)
                    log.info("  ladder %-12s p50=%6.0fus c8=%6.0f/s server cpu/call=%4.0fus", layer,
                             out["sequential"]["p50_us"], out["throughput"][0][RPS], out["server_cpu_us_per_call"])
        except (RuntimeError, TimeoutError) as exc:
            self.note(f"ladder: {exc}")
            return
        finally:
            for s in servers.values():
                s.stop()
        self.results["ladder"] = [
            {"layer": k, "label": LADDER_LABELS[k],
             "p50_us": median_of([o["sequential"]["p50_us"] for o in v]),
             "rps8": median_of([o["throughput"][0][RPS] for o in v]),
             "server_cpu_us_per_call": median_of([o["server_cpu_us_per_call"] for o in v]),
             "rounds": v}
            for k, v in runs.items() if v]

    # ----------------------------------------------------------------- compute + large

    def heavy(self, pkgs: dict[str, Path], workloads: set[str]) -> None:
        """One daemon with 2 runners per model and OMP_NUM_THREADS=1 for compute and large."""
        runners = 2
        env = {"OMP_NUM_THREADS": "1"}
        max_msg = 160 * MIB
        models = {n: pkgs[n] for n in ("compute", "passthrough") if n in pkgs}
        from aotiserve import runner_ext

        fast = ["--native-run-port", "0"] if runner_ext.native_run_available() else []
        try:
            server = procs.start_aotiserve(self.work / "aotiserve-heavy", models, runners=runners, env=env,
                                           extra_args=["--max-message-bytes", str(max_msg), *fast])
        except RuntimeError as exc:
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
        """64 MiB in, 64 MiB out through the daemon's main port and its native data port, and
        through a bare grpcio echo. Every process of it (clients, echo server) runs with the
        huge-page malloc setting ``aotiserve serve`` gives itself (LARGE_ENV)."""
        a = self.args
        nbytes = LARGE_ROWS * 1024 * 4
        out: dict = {"payload_mib": nbytes / MIB, "memory_before": server.memory(),
                     "memcpy": memcpy_rates(nbytes), "process_env": LARGE_ENV}
        cfg = {"kind": "native", "target": server.target, "model": "passthrough", "input_shapes": [[LARGE_ROWS, 1024]],
               "seq_n": a.large_n, "warmup": 1}
        ports = {"native": server.target}
        native_port = server.extra["ready"].get("native_run_port")
        if native_port:
            ports["fast"] = f"127.0.0.1:{native_port}"
        for key, target in ports.items():
            # The server's peak over these calls (VmHWM reset first): the payloads it held at once.
            procs.reset_peak_memory(server.pid)
            before, copied = server.memory(), procs.metric(server, "aotiserve_native_copied_bytes_total")
            res = run_driver(sys.executable, dict(cfg, target=target), env=LARGE_ENV)
            growth = server.memory()["hwm_mib"] - before["rss_mib"]
            gbps = _gbps_round_trip(nbytes, res)
            out[key] = res["sequential"] | {
                "gbps_round_trip": gbps,
                "gbps_one_way": gbps / 2,
                "peak_growth_mib": growth,
                "payloads_held_at_peak": round(growth / (nbytes / MIB), 2)}
            if key == "fast" and copied is not None:
                # The port counts the payload bytes it copies: per request, in payloads.
                calls = cfg["seq_n"] + cfg["warmup"]
                done = procs.metric(server, "aotiserve_native_copied_bytes_total")
                out["fast"]["server_copies"] = round((done - copied) / calls / nbytes, 3)
            if "client" in self.args.systems:  # aotiserve's own client library on the same port
                name = "client" if key == "native" else "fast_client"
                try:
                    c = run_driver(sys.executable, dict(cfg, target=target, kind="client"), env=LARGE_ENV)
                    out[name] = c["sequential"] | {"gbps_round_trip": _gbps_round_trip(nbytes, c)}
                except RuntimeError as exc:
                    self.note(f"64 MiB through aotiserve.client on {target}: {exc}")
        out["gbps_round_trip"] = out["native"]["gbps_round_trip"]
        if "fast" in out:
            out["fast_gbps_round_trip"] = out["fast"]["gbps_round_trip"]
        # The best aotiserve path: what the issue's >= 1 GB/s is judged on.
        paths = {k: out[k]["gbps_round_trip"] for k in ("native", "fast", "client", "fast_client") if k in out}
        out["best_path"] = max(paths, key=paths.get)
        out["best_gbps_round_trip"] = paths[out["best_path"]]
        # The same payload through a bare grpcio echo: grpcio's own ceiling here.
        echo = procs.start_echo(self.work / "echo-large", nbytes, workers=2, env=LARGE_ENV)
        try:
            e = run_driver(sys.executable, {"kind": "echo", "target": echo.target, "req_size": nbytes,
                                            "seq_n": a.large_n, "warmup": 1}, env=LARGE_ENV)
            out["echo"] = e["sequential"]
            out["echo_gbps_round_trip"] = _gbps_round_trip(nbytes, e)
        finally:
            echo.stop()
        try:
            probe = subprocess.run([sys.executable, "-m", "bench.copies"], cwd=REPO, capture_output=True, text=True,
                                   timeout=300, check=True, env=dict(os.environ, **LARGE_ENV))
            out["copy_probe"] = json.loads(probe.stdout.strip().splitlines()[-1])
        except (subprocess.SubprocessError, ValueError) as exc:
            self.note(f"copy probe failed: {exc}")
        log.info("  large: best %s %.2f GB/s round trip (echo %.2f GB/s)", out["best_path"],
                 out["best_gbps_round_trip"], out.get("echo_gbps_round_trip", 0))
        return out

    def compute(self, server: Server, pkgs: dict[str, Path]) -> dict:
        a = self.args
        out: dict = {}
        cfg = {"kind": "native", "target": server.target, "model": "compute", "input_shapes": [[64, 1024]],
               "seq_n": a.compute_seq_n, "warmup": 5, "concurrency": [1, 2] * a.compute_alternations,
               "duration": a.duration, "mode": "threads"}
        native_port = server.extra["ready"].get("native_run_port")
        runs = []
        for r in range(a.rounds):
            run = {"aotiserve": run_driver(sys.executable, cfg)}
            if native_port:  # the same daemon's native data port
                run["fast"] = run_driver(sys.executable, dict(cfg, target=f"127.0.0.1:{native_port}"))
            run["inproc"] = run_driver(sys.executable, dict(cfg, kind="inproc", package=str(pkgs["compute"]),
                                                            num_runners=2))
            runs.append(run)
            log.info("  compute round %d: " + "; ".join(
                f"{who} 1c=%.1f/s 2c=%.1f/s (x%.2f)" for who in run), r + 1,
                *[x for who in run for x in (_rps(run[who], 1), _rps(run[who], 2),
                                             _rps(run[who], 2) / _rps(run[who], 1))])
        out["rounds"] = runs
        med = lambda who, c: median_of([_rps(run[who], c) for run in runs])  # noqa: E731
        for who in runs[0]:
            key = "aotiserve" if who == "aotiserve" else who
            out[f"{key}_rps"] = {"1": med(who, 1), "2": med(who, 2)}
            out[f"{key}_scaling_2_over_1"] = median_of([_rps(run[who], 2) / _rps(run[who], 1) for run in runs])
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
            if "ladder" in a.workloads:
                self.ladder(pkgs)
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
                  "server_cpu_us_per_call": cpu_server, "client_cpu_us_per_call": cpu_client}
    return out


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

    r = {
        "native_p50_over_echo_p50": div(p50("native"), p50("echo")),
        "native_p50_over_kserve_p50": div(p50("native"), p50("kserve")),
        "native_rps8_over_echo": div(rps8("native"), rps8("echo")),
        "native_rps8_over_kserve": div(rps8("native"), rps8("kserve")),
        "native_rps8_over_pytriton": div(rps8("native"), rps8("pytriton")),
        "oip_p50_over_kserve_p50": div(p50("oip"), p50("kserve")),
        "oip_rps8_over_kserve": div(rps8("oip"), rps8("kserve")),
        "client_p50_over_echo_p50": div(p50("client"), p50("echo")),
        "client_rps8_over_echo": div(rps8("client"), rps8("echo")),
        "native_cpu_capacity_over_echo": div(cap("native"), cap("echo")),
        "native_cpu_capacity_over_kserve": div(cap("native"), cap("kserve")),
        "native_cpu_capacity_over_pytriton": div(cap("native"), cap("pytriton")),
        "fast_p50_over_echo_p50": div(p50("fast"), p50("echo")),
        "fast_p50_over_kserve_p50": div(p50("fast"), p50("kserve")),
        "fast_rps8_over_echo": div(rps8("fast"), rps8("echo")),
        "fast_rps8_over_kserve": div(rps8("fast"), rps8("kserve")),
        "fast_rps8_over_pytriton": div(rps8("fast"), rps8("pytriton")),
        "compute_scaling_2_over_1": results.get("compute", {}).get("aotiserve_scaling_2_over_1"),
        "fast_compute_scaling_2_over_1": results.get("compute", {}).get("fast_scaling_2_over_1"),
        "large_gbps_round_trip": results.get("large", {}).get("gbps_round_trip"),
        "large_payloads_held_at_peak": results.get("large", {}).get("native", {}).get("payloads_held_at_peak"),
        "fast_large_payloads_held_at_peak": results.get("large", {}).get("fast", {}).get("payloads_held_at_peak"),
        "large_server_copies": results.get("large", {}).get("copy_probe", {}).get("server_copies"),
        "fast_large_gbps_round_trip": results.get("large", {}).get("fast_gbps_round_trip"),
        "best_large_gbps_round_trip": results.get("large", {}).get("best_gbps_round_trip"),
        "fast_large_server_copies": results.get("large", {}).get("fast", {}).get("server_copies"),
    }
    targets = {
        "native_p50_over_echo_p50": ("<=", 1.25), "native_p50_over_kserve_p50": ("<=", 0.6),
        "native_rps8_over_echo": (">=", 0.8), "native_rps8_over_kserve": (">=", 2.5),
        "native_rps8_over_pytriton": (">=", 3.0), "compute_scaling_2_over_1": (">=", 1.7),
        "large_gbps_round_trip": (">=", 1.0), "large_server_copies": ("<=", 1),
        "fast_p50_over_echo_p50": ("<=", 1.25), "fast_p50_over_kserve_p50": ("<=", 0.6),
        "fast_rps8_over_echo": (">=", 0.8), "fast_rps8_over_kserve": (">=", 2.5),
        "fast_rps8_over_pytriton": (">=", 3.0), "fast_compute_scaling_2_over_1": (">=", 1.7),
        "best_large_gbps_round_trip": (">=", 1.0), "fast_large_server_copies": ("<=", 1),
    }
    r["acceptance"] = {
        k: {"value": r[k], "target": f"{op} {t}",
            "met": None if r[k] is None else (r[k] <= t if op == "<=" else r[k] >= t)}
        for k, (op, t) in targets.items()
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
    a.profile_s = 2.0 if a.quick else 8.0
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
