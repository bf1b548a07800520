"""Keeps bench/soak.py working: a ~25 s soak against a daemon process (inference from
several threads, weight stage/swap/rollback/free cycles, malformed requests), which must
see 0 unexpected errors. No timing or memory assertions: the 10-minute run reports those."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_short_soak_has_no_unexpected_errors(tmp_path):
    out = tmp_path / "soak.json"
    cmd = [
        sys.executable,
        "-m",
        "bench.soak",
        "--minutes",
        "0.4",
        "--interval-s",
        "5",
        "--threads",
        "3",
        "--swap-every-s",
        "1.5",
        "--bad-share",
        "0.1",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    summary = json.loads(out.read_text())
    assert summary["unexpected_errors"] == 0, summary["unexpected_samples"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert summary["daemon_alive_at_end"]
    totals = summary["totals"]
    assert totals["good"] > 0 and totals["bad"] > 0
    assert totals.get("weights_swap", 0) >= 1 and totals.get("weights_rollback", 0) >= 1
    rows = summary["intervals"]
    assert rows and all(r["rss_mib"] > 0 for r in rows)
