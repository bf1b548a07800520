"""Core spreading (runner_ext/csrc/core_spread.cpp): long single-threaded CPU runs that
overlap get a core each, and the daemon's use of it.

Turning it on is process-wide, so the unit checks run in a child process (with
OMP_NUM_THREADS=1, as a daemon serving compute-bound models on few cores runs).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import model_zoo
import numpy as np
import pytest
from server_harness import daemon_process

from aotiserve.client import Client

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 or more cores")

_UNIT = textwrap.dedent("""
    import os, sys, threading
    import torch
    from aotiserve import runner_ext as rx

    compute = rx.load_model(sys.argv[1], num_runners=2).runner  # ~7 ms a run here
    tiny = rx.load_model(sys.argv[2]).runner               # microseconds
    x = torch.randn(64, 1024)
    t = torch.randn(1, 64)
    allowed = os.sched_getaffinity(0)

    def total(s):
        return sum(s["runs"].values())

    assert rx.core_spread_stats() is None  # off until turned on
    compute.run([x])
    assert rx.core_spread_stats() is None
    rx.set_core_spread(True)
    assert rx.core_spread_stats() == {"runs": {}, "moved": 0, "shared": 0}

    # A long run alone is left where it is: nothing to gain.
    for _ in range(3):
        compute.run([x])
    assert total(rx.core_spread_stats()) == 0, rx.core_spread_stats()

    def in_threads(n, calls, masks):
        def work():
            for _ in range(calls):
                compute.run([x])
            masks.append(os.sched_getaffinity(0))
        threads = [threading.Thread(target=work) for _ in range(n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()

    # Two threads at once: a run that starts beside the other's gets the other core, and
    # every thread has its mask back after.
    masks = []
    in_threads(2, 10, masks)
    s = rx.core_spread_stats()
    assert total(s) >= 1 and s["shared"] == 0, s
    assert masks == [allowed, allowed], masks

    # Microsecond runs are left where they are, alone or not.
    before = total(rx.core_spread_stats())
    for _ in range(200):
        tiny.run([t])
    assert total(rx.core_spread_stats()) == before, rx.core_spread_stats()

    # Runs of several intra-op threads spread themselves: not pinned.
    torch.set_num_threads(2)
    in_threads(2, 3, [])
    assert total(rx.core_spread_stats()) == before, rx.core_spread_stats()

    rx.set_core_spread(False)
    assert rx.core_spread_stats() is None
    print("ok", s)
""")


def test_overlapping_long_runs_get_a_core_each_others_are_left_alone():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _UNIT,
            str(model_zoo.compiled("compute")),
            str(model_zoo.compiled("mlp")),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok"), proc.stdout


def _two_clients(target: str, calls: int) -> None:
    x = np.random.default_rng(0).standard_normal((64, 1024)).astype(np.float32)
    errors = []

    def client():
        try:
            with Client(target) as c:
                for _ in range(calls):
                    (y,) = c.model("compute").run([x], output_format="numpy")
                    assert y.shape == (64, 1024)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_the_daemon_spreads_two_clients_runs_over_two_cores():
    args = ["--metrics-port", "0", "--runners-per-model", "2"]
    with daemon_process(["compute"], args, env={"OMP_NUM_THREADS": "1"}) as d:
        _two_clients(d.target, 8)
        s = d.metric_samples("aotiserve_spread_runs")
    per_cpu = {k: v for k, v in s.items() if k.startswith("aotiserve_spread_runs_total{")}
    # Runs that started beside the other client's got the other core; none shared one.
    assert sum(per_cpu.values()) >= 1, s
    assert s["aotiserve_spread_runs_shared_total"] == 0, s


def test_no_spread_runs_leaves_them_alone():
    with daemon_process(
        ["compute"], ["--metrics-port", "0", "--no-spread-runs"], env={"OMP_NUM_THREADS": "1"}
    ) as d:
        _two_clients(d.target, 2)
        assert d.metric_samples("aotiserve_spread_runs") == {}
