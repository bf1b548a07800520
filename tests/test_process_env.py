"""Malloc settings and huge pages: the environment `aotiserve serve` restarts itself with."""

from __future__ import annotations

import json
import os
import platform
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_harness import daemon_process

from aotiserve.server import process_env


@pytest.mark.parametrize(
    "text, mode",
    [
        ("always [madvise] never\n", "madvise"),
        ("[always] madvise never\n", "always"),
        ("always madvise [never]\n", "never"),
        ("garbage\n", None),
    ],
)
def test_thp_mode_reads_the_bracketed_setting(tmp_path, text, mode):
    setting = tmp_path / "enabled"
    setting.write_text(text)
    assert process_env.thp_mode(setting) == mode


def test_thp_mode_is_none_where_the_kernel_has_no_setting(tmp_path):
    assert process_env.thp_mode(tmp_path / "absent") is None


THRESHOLDS = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456"


def test_malloc_env_adds_what_is_missing_and_keeps_the_users_settings():
    assert process_env.malloc_env({}, "madvise") == {
        "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1:" + THRESHOLDS,
        "THP_MEM_ALLOC_ENABLE": "1",
    }
    assert process_env.malloc_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "always") == {
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1:" + THRESHOLDS,
        "THP_MEM_ALLOC_ENABLE": "1",
    }
    # A choice the user made either way stands; nothing left to add: no restart.
    assert (
        process_env.malloc_env(
            {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0:" + THRESHOLDS, "THP_MEM_ALLOC_ENABLE": "0"},
            "madvise",
        )
        == {}
    )
    assert process_env.malloc_env(
        {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"}, "never"
    ) == {
        "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576:"
        "glibc.malloc.trim_threshold=268435456"
    }
    # THP off or unknown: the thresholds alone.
    assert process_env.malloc_env({}, "never") == {"GLIBC_TUNABLES": THRESHOLDS}
    assert process_env.malloc_env({}, None) == {"GLIBC_TUNABLES": THRESHOLDS}


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def _serving(d) -> bool:
    with grpc.insecure_channel(d.target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status
    return status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.skipif(
    process_env.thp_mode() not in ("always", "madvise"),
    reason="transparent huge pages are off or unknown here",
)
def test_the_daemon_restarts_itself_in_place_with_huge_pages():
    with daemon_process(["mlp"]) as d:
        env = _environ(d.proc.pid)  # the same pid serves: exec, not a child
        assert "glibc.malloc.hugetlb=1" in env.get("GLIBC_TUNABLES", ""), env
        # (glibc 2.36 rewrites this copy of GLIBC_TUNABLES, keeping only the first tunable
        # that it applied: the thresholds after it are applied too, but not shown here.)
        assert env.get("THP_MEM_ALLOC_ENABLE") == "1"
        assert _serving(d)
    with daemon_process(["mlp"], ["--no-huge-pages"]) as d:
        env = _environ(d.proc.pid)
        assert "GLIBC_TUNABLES" not in env and "THP_MEM_ALLOC_ENABLE" not in env
        assert _serving(d)


@pytest.mark.skipif("OMP_NUM_THREADS" in os.environ, reason="set here: the daemon keeps it")
def test_the_daemon_gives_each_runner_its_share_of_the_cpus():
    with daemon_process(["mlp"], ["--no-huge-pages", "--runners-per-model", "1"]) as d:
        assert _environ(d.proc.pid)["OMP_NUM_THREADS"] == str(process_env.cpu_count())
        assert _serving(d)


# --------------------------------------------------------------------------- time slice

_EEVDF_SLICES = tuple(int(x) for x in platform.release().split("-")[0].split(".")[:2]) >= (6, 12)
needs_slices = pytest.mark.skipif(
    not _EEVDF_SLICES or process_env.thread_slice_ns() is None,
    reason="the kernel takes no time slice per thread (Linux < 6.12)",
)


def _slices(pid: int) -> dict[int, int]:
    """Each live thread of process ``pid``: its slice."""
    out = {int(t): process_env.thread_slice_ns(t, pid) for t in os.listdir(f"/proc/{pid}/task")}
    return {tid: ns for tid, ns in out.items() if ns is not None}


def test_sched_attr_is_the_kernels_version_0_struct():
    attr = process_env._sched_attr(os.SCHED_BATCH, 5, 20_000_000)
    assert len(attr) == 48
    size, policy, flags, nice, prio, runtime, deadline, period = struct.unpack("IIQiIQQQ", attr)
    assert (size, policy, flags, nice, prio, runtime, deadline, period) == (
        48,
        os.SCHED_BATCH,
        0,
        5,
        0,
        20_000_000,
        0,
        0,
    )


def test_set_time_slice_of_zero_touches_nothing():
    assert process_env.set_time_slice(0) == 0


@needs_slices
def test_every_thread_takes_the_slice_keeps_its_nice_value_and_passes_it_on():
    # In a child process: the test runner's own threads keep the kernel's slice.
    code = textwrap.dedent("""
        import json, os, threading
        from aotiserve.server import process_env as p
        ready, done = threading.Event(), threading.Event()
        def niced():
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 7)
            ready.set(); done.wait()
        t = threading.Thread(target=niced); t.start(); ready.wait()
        took = p.set_time_slice(20)
        later = {}
        def child():
            later["slice"] = p.thread_slice_ns()
        c = threading.Thread(target=child); c.start(); c.join()
        out = {"took": took, "main": p.thread_slice_ns(), "niced": p.thread_slice_ns(t.native_id),
               "nice": os.getpriority(os.PRIO_PROCESS, t.native_id), "child": later["slice"]}
        done.set(); t.join()
        print(json.dumps(out))
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    out = json.loads(proc.stdout)
    assert out == {
        "took": 2,
        "main": 20_000_000,
        "niced": 20_000_000,
        "nice": 7,
        "child": 20_000_000,
    }, out


@needs_slices
def test_the_daemons_threads_run_with_the_configured_slice():
    with daemon_process(["mlp"]) as d:
        assert _serving(d)
        slices = _slices(d.proc.pid)
        assert len(slices) > 3 and set(slices.values()) == {20_000_000}, slices
    with daemon_process(["mlp"], ["--time-slice-ms", "0"]) as d:
        assert _serving(d)
        assert 20_000_000 not in _slices(d.proc.pid).values()


def test_threads_env_gives_each_runner_its_share_of_the_cpus():
    assert process_env.threads_env({}, 8, 2) == {"OMP_NUM_THREADS": "4"}
    assert process_env.threads_env({}, 2, 2) == {"OMP_NUM_THREADS": "1"}
    assert process_env.threads_env({}, 1, 4) == {"OMP_NUM_THREADS": "1"}
    assert process_env.threads_env({}, 6, 4) == {"OMP_NUM_THREADS": "1"}
    assert process_env.threads_env({"OMP_NUM_THREADS": "3"}, 8, 2) == {}  # the user's, kept
    assert process_env.cpu_count() >= 1


def test_cpu_count_keeps_to_a_cgroup_quota(tmp_path):
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")  # a limit of 1.5 CPUs
    assert process_env.cpu_count(cpu_max) == min(2, len(os.sched_getaffinity(0)))
    cpu_max.write_text("max 100000\n")
    assert process_env.cpu_count(cpu_max) == len(os.sched_getaffinity(0))
    assert process_env.cpu_count(tmp_path / "absent") == len(os.sched_getaffinity(0))
