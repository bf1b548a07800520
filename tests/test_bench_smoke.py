"""Keeps the benchmark suite working: a few-second run of its in-process, echo floors
(gRPC C++ and grpcio) and aotiserve parts (no peers), checked for well-formed results.
No timing assertions."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SYSTEMS = ("inproc", "echo_cpp", "echo", "run", "oip")


@pytest.fixture(scope="module")
def bench_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.json"
    docs = out.with_name("benchmarks.md")
    cmd = [
        sys.executable,
        "-m",
        "bench.run_all",
        "--quick",
        "--no-peers",
        "--no-install",
        "--no-plots",
        "--workloads",
        "tiny,memory",
        "--systems",
        ",".join(SYSTEMS),
        "--concurrency",
        "1,8",
        "--out",
        str(out),
        "--docs",
        str(docs),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), docs.read_text()


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_every_system_measured(bench_results):
    results, _ = bench_results
    summary = results["tiny"]["summary"]
    assert set(SYSTEMS) <= set(summary), (summary.keys(), results["notes"])
    for name in SYSTEMS:
        seq = summary[name]["sequential"]
        assert seq["p50_us"] <= seq["p99_us"]
        assert all(_positive(seq[k]) for k in ("p50_us", "p90_us", "p99_us", "mean_us"))
        assert set(summary[name]["rps"]) == {"1", "8"}
        assert all(_positive(v) for v in summary[name]["rps"].values())
        assert summary[name]["errors"] == 0


def test_memory_and_ratios_present(bench_results):
    results, _ = bench_results
    mem = results["memory"]["aotiserve"]
    assert _positive(mem["at_rest"]["rss_mib"])
    assert mem["under_load_peak"]["rss_mib"] >= 1
    ratios = results["ratios"]
    for key in (
        "run_p50_over_echo_cpp_p50",
        "run_p50_over_echo_p50",
        "run_rps8_over_echo_cpp",
        "oip_p50_over_run_p50",
        "oip_rps8_over_run",
    ):
        assert _positive(ratios[key]), key
        assert ratios["acceptance"][key]["met"] in (True, False), key
    # Measured on the daemon's own hot-path counter: a share of the calls, whatever it is.
    for name in ("run", "oip"):
        share = results["tiny"]["summary"][name]["hot_path_share"]
        assert isinstance(share, float) and 0 <= share <= 1.01, (name, share)
    assert results["meta"]["machine"]["cpus"] >= 1


def test_report_renders(bench_results):
    _, markdown = bench_results
    assert markdown.startswith("# Benchmarks")
    assert "| aotiserve Run |" in markdown
    assert "bare gRPC C++ echo (floor)" in markdown
    assert "bare grpcio echo (floor)" in markdown
    assert "Acceptance ratios (issue 16)" in markdown


def test_hot_path_cost_accounts_for_a_run(tmp_path):
    out = tmp_path / "cost.json"
    cmd = [sys.executable, "-m", "bench.hot_path_cost", "--blocks", "2", "--block", "20"]
    proc = subprocess.run(
        [*cmd, "--warmup", "20", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    systems = ("echo_cpp", "echo_cpp_trailer", "run", "inproc")
    assert all(_positive(res["p50_us"][k]) for k in systems)
    assert _positive(res["run_over_echo_cpp"])
    # The daemon's own account covers exactly the calls made: its parts are all there.
    assert {"success", "compute_infer", "compute_input", "compute_output"} <= set(res["port_us"])
    assert res["port_us"]["compute_infer"] < res["port_us"]["success"]
    assert "the trailer (echo with it − echo)" in proc.stdout
    assert isinstance(res["trailer_us"], float) and isinstance(res["rest_us"], float)
