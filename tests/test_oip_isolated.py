"""Runs test_oip.py, test_oip_statistics.py and test_oip_shared_memory.py in a fresh
interpreter when this pytest process cannot.

They drive the daemon with tritonclient, whose ``inference.*``
protobuf messages clash with our generated ``aotiserve.oip`` ones in the
process-wide descriptor pool. If a module collected earlier in this session
imported ``aotiserve.oip`` (in-process stubs), they skip themselves and
this test runs them in a subprocess, so `make test` still covers it. Tests that
need OIP stubs in process can use ``oip_stub.py`` instead of ``aotiserve.oip``
and keep the session clash-free.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(
    "aotiserve.oip.inference_pb2" not in sys.modules,
    reason="test_oip.py and test_oip_statistics.py run in this process",
)
def test_oip_suite_in_fresh_interpreter():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(HERE / "test_oip.py"),
            str(HERE / "test_oip_statistics.py"),
            str(HERE / "test_oip_shared_memory.py"),
        ],
        cwd=HERE.parent,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
