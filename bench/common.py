"""What every bench workload shares: names, machine facts, the driver process, samplers.

Workloads (bench/tiny.py, bench/heavy.py) measure through :func:`run_driver`, which runs
bench/driver.py (one client library, grpcio with the generated classes) in its own
process; bench/run_all.py runs them in order and writes the report.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import procs
from .procs import REPO, Server

log = logging.getLogger("bench")

RESULTS_DIR = REPO / "bench" / "results"
DOCS = REPO / "docs" / "benchmarks.md"

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
    info = {
        "name": machine_name(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
        with open("/proc/meminfo") as f:
            info["mem_total_mib"] = int(f.readline().split()[1]) // 1024
    except (OSError, StopIteration):
        pass
    import grpc
    import torch

    info["torch"] = torch.__version__
    info["grpcio"] = grpc.__version__
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        # The bench runs the working tree: say which measured files differ from the commit.
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "server", "runner_ext", "client", "bench"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.split("\n")
        info["uncommitted"] = [line[3:] for line in dirty if line.strip()]
    except OSError:
        pass
    return info


def packages(names, device: str = "cpu") -> dict[str, Path]:
    """The zoo's packages ``names``, compiled for ``device`` ("cpu", "cuda") on a cache miss."""
    sys.path.insert(0, str(REPO / "tests"))
    import model_zoo  # noqa: E402  (the test zoo is the bench's zoo too)

    return {n: model_zoo.compiled(n, device=device) for n in names}


def run_request(model: str, shapes: list[list[int]]) -> bytes:
    """The serialized RunRequest the driver sends for ``model`` (bench/driver.py's inputs)."""
    from aotiserve.v1 import model_runner_pb2 as pb

    from .driver import _inputs

    return pb.RunRequest(
        model=model,
        inputs=[
            pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=a.shape, data=a.tobytes())
            for a in _inputs({"input_shapes": shapes})
        ],
    ).SerializeToString()


def run_reply(
    target: str | None, model: str, shapes: list[list[int]], out_shape: list[int]
) -> bytes:
    """The echo floors' reply: the bytes aotiserve answers this Run with (asked of the daemon at
    ``target``), or, without a daemon, a RunResponse of ``out_shape`` float32 built here."""
    if target:
        import grpc

        from .driver import CHANNEL_OPTIONS, RUN_METHOD

        try:
            with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as ch:
                return ch.unary_unary(RUN_METHOD)(run_request(model, shapes), timeout=120)
        except grpc.RpcError as exc:
            log.warning(
                "Run on %s failed (%s): the echo floors answer a reply built here",
                target,
                exc.code(),
            )
    from aotiserve.v1 import model_runner_pb2 as pb

    n = 4
    for d in out_shape:
        n *= d
    return pb.RunResponse(
        outputs=[pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=out_shape, data=bytes(n))],
        weights_version="initial",
    ).SerializeToString()


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


def run_driver(
    python: Path | str, cfg: dict, timeout: float = 900, env: dict | None = None
) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(env or {}))
    proc = subprocess.run(
        [str(python), str(REPO / "bench" / "driver.py"), json.dumps(cfg)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=str(REPO),
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"driver for {cfg['kind']} failed ({proc.returncode}): {proc.stderr[-2000:]}"
        )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["loadavg_1m_after"] = os.getloadavg()[0]  # others' work on the same cores shows here
    return out


def gbps_round_trip(nbytes: int, res: dict) -> float:
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
    return {
        "touched_gbps": nbytes / min(warm) / 1e9,
        "fresh_gbps": nbytes / min(fresh) / 1e9,
        "fresh_ms_per_copy": 1e3 * min(fresh),
    }


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


def print_ways(p50: dict[str, list[float]], base: str, digits: int = 1) -> None:
    """One line per way: the median of its rounds, its ratio to way ``base``, the rounds."""
    ref = statistics.median(p50[base])
    width = max(len(name) for name in p50)
    for name, values in p50.items():
        med = statistics.median(values)
        print(
            f"  {name:{width}} {med:9.{digits}f}  ({med / ref:.3f}x {base})  rounds "
            f"{[round(v, digits) for v in values]}"
        )


def median_of(values):
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def rps_at(result: dict, c: int) -> float:
    """Median req/s over the windows run with ``c`` clients (compute alternates 1, 2, 1, 2...)."""
    return statistics.median(t[RPS] for t in result["throughput"] if t["concurrency"] == c)


# The daemon's own account of where a request's time went (OIP ModelStatistics; the table in
# server/oip_statistics.py): its whole time, the wait for a runner, the run (device copies
# included), decoding the inputs and encoding the outputs.
SERVER_PARTS = ("success", "queue", "compute_infer", "compute_input", "compute_output")


def hot_calls(server: Server) -> float | None:
    """Calls the daemon's C++ hot path answered so far, ``Run`` and ``ModelInfer`` together
    (aotiserve.client sends a large run as a ``ModelInfer`` through shared memory)."""
    counts = [procs.metric(server, HOT_METRIC, {"method": m}) for m in ("Run", "ModelInfer")]
    if all(c is None for c in counts):
        return None
    return sum(c or 0.0 for c in counts)


def server_times(target: str, model: str) -> dict[str, tuple[int, int]]:
    """(count, ns) of each of :data:`SERVER_PARTS` for ``model`` on the daemon at ``target``."""
    import grpc

    from aotiserve.server.oip_codec import SERVICE_NAME, messages

    ipb = messages()
    with grpc.insecure_channel(target) as channel:
        stats = channel.unary_unary(
            f"/{SERVICE_NAME}/ModelStatistics",
            request_serializer=ipb.ModelStatisticsRequest.SerializeToString,
            response_deserializer=ipb.ModelStatisticsResponse.FromString,
        )(ipb.ModelStatisticsRequest(name=model), timeout=30)
    s = stats.model_stats[0].inference_stats
    return {part: (getattr(s, part).count, getattr(s, part).ns) for part in SERVER_PARTS}


def server_us_per_request(before: dict, after: dict) -> dict[str, float]:
    """Mean µs per request of each part between two :func:`server_times` readings."""
    out = {}
    for part in SERVER_PARTS:
        count = after[part][0] - before[part][0]
        if count:
            out[part] = round((after[part][1] - before[part][1]) / count / 1e3, 1)
    return out
