"""The cache of large CPU blocks (runner_ext/csrc/cpu_cache.cpp) and the daemon's use of it.

Installing it is process-wide and for good, so the unit checks run in a child process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
from server_harness import daemon_process

from aotiserve.client import Client

MIB = 1 << 20

_UNIT = textwrap.dedent("""
    import torch
    from aotiserve import runner_ext as rx

    MIB = 1 << 20
    def floats(mib):
        return mib * MIB // 4

    assert rx.cpu_block_cache_stats() is None  # off until installed
    rx.install_cpu_block_cache(100 * MIB)
    s = rx.cpu_block_cache_stats()
    counts = (s["hits"], s["misses"], s["cached_bytes"], s["min_block_bytes"])
    assert counts == (0, 0, 0, 32 * MIB), s

    small = torch.ones(floats(8))  # below 32 MiB: the allocator underneath
    del small
    assert rx.cpu_block_cache_stats()["misses"] == 0

    a = torch.arange(floats(40), dtype=torch.float32)
    ptr = a.data_ptr()
    del a
    s = rx.cpu_block_cache_stats()
    assert (s["misses"], s["cached_bytes"], s["cached_blocks"]) == (1, 40 * MIB, 1), s

    b = torch.full((floats(39),), 2.0)  # fits the kept 40 MiB block (at most 1/4 larger)
    assert b.data_ptr() == ptr and bool((b == 2.0).all())
    s = rx.cpu_block_cache_stats()
    assert (s["hits"], s["cached_bytes"], s["live_blocks"]) == (1, 0, 1), s
    del b

    c = torch.zeros(floats(60))  # fits nothing kept: every kept block is given back first
    s = rx.cpu_block_cache_stats()
    assert (s["misses"], s["cached_bytes"], s["live_blocks"]) == (2, 0, 1), s
    d = torch.zeros(floats(60))
    del c, d  # 120 MiB freed against a 100 MiB limit: one block is kept, one given back
    s = rx.cpu_block_cache_stats()
    assert (s["cached_bytes"], s["cached_blocks"], s["live_blocks"]) == (60 * MIB, 1, 0), s

    rx.install_cpu_block_cache(32 * MIB)  # again: only lowers the limit (and trims to it)
    s = rx.cpu_block_cache_stats()
    assert (s["limit_bytes"], s["cached_bytes"]) == (32 * MIB, 0), s
    rx.install_cpu_block_cache(100 * MIB)
    e = torch.ones(floats(34)); del e
    assert rx.cpu_block_cache_stats()["cached_bytes"] == 34 * MIB
    rx.trim_cpu_block_cache(3600.0)  # kept for less than an hour: stays
    assert rx.cpu_block_cache_stats()["cached_bytes"] == 34 * MIB
    rx.trim_cpu_block_cache(0.0)  # unused for longer than no time at all: given back
    assert rx.cpu_block_cache_stats()["cached_bytes"] == 0
    f = torch.ones(floats(34)); del f
    rx.empty_cpu_block_cache()
    assert rx.cpu_block_cache_stats()["cached_bytes"] == 0

    # Kept blocks serve every tensor op, with the values intact.
    x = torch.randn(floats(36) // 1024, 1024)
    for _ in range(3):
        y = x * 2 + 1
        assert torch.allclose(y, x * 2 + 1)
    print("ok", rx.cpu_block_cache_stats())
""")


def test_large_blocks_are_kept_reused_bounded_and_given_back_when_idle():
    proc = subprocess.run(
        [sys.executable, "-c", _UNIT], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok"), proc.stdout


def test_the_daemon_reuses_large_output_blocks_across_runs():
    x = np.random.default_rng(0).standard_normal((9000, 1024)).astype(np.float32)  # 35 MiB
    with daemon_process(["passthrough"], ["--metrics-port", "0"]) as d:
        with Client(d.target) as client:
            model = client.model("passthrough")
            for _ in range(3):
                (y,) = model.run([x], output_format="numpy")
                np.testing.assert_allclose(y, x, rtol=0, atol=1e-6)  # x * 1 + 0
        samples = d.metric_samples("aotiserve_cpu_block_cache")
    hits = samples['aotiserve_cpu_block_cache_allocations_total{outcome="hit"}']
    assert hits >= 2, samples  # every run after the first took the kept output block
    assert samples["aotiserve_cpu_block_cache_bytes"] >= 35 * MIB, samples


def test_a_limit_of_zero_turns_the_cache_off():
    with daemon_process(
        ["passthrough"], ["--metrics-port", "0", "--cpu-block-cache-bytes", "0"]
    ) as d:
        assert d.metric_samples("aotiserve_cpu_block_cache") == {}
