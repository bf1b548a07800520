"""Where the daemon's Python time goes per native Run, from py-spy.

Samples the daemon with ``py-spy record --gil`` (only the thread holding the
GIL is sampled, i.e. Python work, which is what serializes a grpcio server)
while one client process drives it, then turns sample counts into
microseconds of GIL time per request, per function (inclusive) and per
source area (aotiserve's own code, grpcio, prometheus_client, protobuf...).
"""

from __future__ import annotations

import collections
import json
import logging
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .procs import Server

log = logging.getLogger(__name__)

RATE_HZ = 500


def py_spy() -> str | None:
    exe = Path(sys.executable).with_name("py-spy")
    return str(exe) if exe.exists() else shutil.which("py-spy")


def _area(frame: str) -> str:
    if "(server/" in frame or "aotiserve/server" in frame:
        return "aotiserve server code"
    if "grpc/" in frame:
        return "grpcio (Python side)"
    if "prometheus_client" in frame:
        return "prometheus_client"
    if "protobuf" in frame or "_pb2" in frame:
        return "protobuf"
    if "threading.py" in frame or "concurrent/futures" in frame:
        return "threading / executor"
    if "torch/" in frame:
        return "torch (Python side)"
    return "other"


def analyse(raw_path: Path, requests: int, seconds: float) -> dict:
    """Inclusive µs of GIL time per request for each function; self time per area."""
    incl: collections.Counter = collections.Counter()
    area_self: collections.Counter = collections.Counter()
    total = 0
    for line in raw_path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        n = int(n)
        total += n
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        for f in set(frames):
            incl[f] += n
        area_self[_area(frames[-1])] += n
    per_sample_us = 1e6 / RATE_HZ / max(1, requests)

    def us(n: int) -> float:
        return round(n * per_sample_us, 1)

    top = [{"function": f, "us_per_request": us(n), "share": round(n / total, 3)}
           for f, n in incl.most_common(60)
           if not f.startswith(("Thread.", "_bootstrap", "<module>", "_run_", "run (threading")) and "(" in f]
    return {
        "samples": total, "requests": requests, "seconds": seconds, "rate_hz": RATE_HZ,
        "gil_us_per_request": us(total),
        "areas_self_us_per_request": {a: us(n) for a, n in area_self.most_common()},
        "top_inclusive": top[:30],
    }


def profile_daemon(server: Server, run_driver, cfg: dict, seconds: float, workdir: Path) -> dict:
    """Samples ``server`` for ``seconds`` while the driver (one client, sequential) runs."""
    exe = py_spy()
    if exe is None:
        raise RuntimeError("py-spy is not installed (pip install -r bench/requirements.txt)")
    raw = workdir / "profile.txt"
    # The driver runs a throughput window long enough to cover the sampling.
    cfg = dict(cfg, seq_n=0, concurrency=[cfg.get("profile_clients", 1)], duration=seconds + 2.0, tp_warm=1.0)
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("driver.py")), json.dumps(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    spy = subprocess.run([exe, "record", "-p", str(server.pid), "-d", str(int(seconds)), "-r", str(RATE_HZ),
                          "--gil", "--nonblocking", "-f", "raw", "-o", str(raw)],
                         capture_output=True, text=True)
    out, err = proc.communicate(timeout=seconds + 120)
    if spy.returncode != 0 or not raw.exists():
        raise RuntimeError(f"py-spy failed: {spy.stderr[-500:]}")
    result = json.loads(out.strip().splitlines()[-1])
    window = result["throughput"][0]
    # Requests during the sampled seconds: the window's mean rate times the sampled time.
    requests = int(window["rps"] * seconds)
    res = analyse(raw, requests, seconds)
    res["clients"] = cfg["concurrency"][0]
    res["rps_during"] = window["rps"]
    lag = re.findall(r"behind in sampling", spy.stderr)
    if lag:
        res["warning"] = "py-spy fell behind while sampling; µs figures are lower bounds"
    return res
