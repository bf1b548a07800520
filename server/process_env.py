"""The process the daemon runs as: how its allocators get memory, the time slice of its threads.

Each copy of a 64 MiB tensor into fresh memory faults in 16,384 pages of 4 KiB; on
this kind of machine that costs more than the copy (about 35 ms against 6 ms). With
transparent huge pages it is 32 faults. Two allocators matter: glibc's malloc (the
``bytes`` grpcio hands Python, the messages protobuf builds) takes huge pages with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, and torch's CPU allocator (tensors the
models write, the port's joined request buffers) with ``THP_MEM_ALLOC_ENABLE=1``.
Both are read once, when the process starts, so ``aotiserve serve`` executes itself
again (same pid) with them set, before anything large is allocated.

Payloads of a few MiB (upload chunks, 256 KiB-64 MiB tensors) sit above malloc's mmap
threshold: each one was mapped, faulted in page by page, zeroed and unmapped again. With
the threshold at 32 MiB and the heap trimmed only above 256 MiB free, they reuse heap memory
instead: a 1 GiB upload in 4 MiB chunks went from 0.87-0.96 GB/s to 0.91-1.23 GB/s. Both
tunables are set with the huge-page ones. All of it off with ``huge_pages = false``
(``--no-huge-pages``); huge pages alone off where the kernel has THP off. A setting the user
made is kept.

On 2 cores shared with clients, a compute-bound run (the zoo's ``compute``, ~7 ms) was
preempted about 3 times per request by waking client and I/O threads, each time losing its
caches. Linux's EEVDF scheduler (6.12 on) takes a time slice per thread from
``sched_setattr``: with 20 ms instead of the default ~1.4 ms for every thread of the
daemon, 2 clients ran 1.67-1.75x one client instead of 1.59-1.66x, and tiny requests were
no slower (p50 and 8-client throughput the same). ``time_slice_ms = 0`` leaves the kernel's.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import struct
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
GLIBC_HUGETLB = "glibc.malloc.hugetlb"
# Payload-sized blocks come from the heap, and stay there between requests.
MALLOC_THRESHOLDS = (
    ("glibc.malloc.mmap_threshold", str(32 << 20)),
    ("glibc.malloc.trim_threshold", str(256 << 20)),
)


def thp_mode(setting: Path = THP_SETTING) -> str | None:
    """The kernel's THP mode ("always", "madvise", "never"); None where unknown."""
    try:
        text = setting.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def malloc_env(env: Mapping[str, str], mode: str | None) -> dict[str, str]:
    """The variables to add to ``env`` (empty: nothing to change): malloc's thresholds,
    and huge pages where the kernel's THP ``mode`` allows. A setting the user made (a
    tunable named in GLIBC_TUNABLES, THP_MEM_ALLOC_ENABLE set) is left as it is."""
    huge = mode in ("always", "madvise")
    tunables = env.get("GLIBC_TUNABLES", "")
    wanted = ((GLIBC_HUGETLB, "1"),) * huge + MALLOC_THRESHOLDS
    missing = [f"{name}={value}" for name, value in wanted if name not in tunables]
    updates = {}
    if missing:
        updates["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, *missing) if t)
    if huge and "THP_MEM_ALLOC_ENABLE" not in env:
        updates["THP_MEM_ALLOC_ENABLE"] = "1"
    return updates


def threads_env(env: Mapping[str, str], cpus: int, runners: int) -> dict[str, str]:
    """``OMP_NUM_THREADS`` for the daemon where the user set none: ``cpus // runners``, at
    least 1 (empty: nothing to change).

    ATen's and AOTInductor's CPU kernels run OpenMP parallel regions from the thread that
    calls the model, and libgomp gives every such thread a team of its own of
    OMP_NUM_THREADS threads (by default one per CPU). The port runs models on gRPC's threads
    (up to ``grpc_workers`` of them): each one paid for its team at its first run, after any
    warm-up (milliseconds on 2 CPUs, several times the steady p50), and ``runners`` runs at
    once each asked for every CPU. With ``cpus // runners`` threads per run, concurrent
    runs fill the CPUs without oversubscribing them, and where there are as many runners
    as CPUs no team is made at all."""
    if "OMP_NUM_THREADS" in env:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, cpus // max(1, runners)))}


def cpu_count(cgroup: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The CPUs this process may use: its affinity, and no more than a cgroup v2 CPU quota
    (a container's CPU limit) where one is set, rounded up."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota, period = cgroup.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def restart_with_env(
    env: Mapping[str, str], argv: Sequence[str], updates: Mapping[str, str]
) -> None:
    """Executes ``python -m aotiserve.server argv`` in place of this process with
    ``updates`` added to its environment (malloc's settings, :func:`malloc_env`; intra-op
    threads, :func:`threads_env`), when there are any; returns only when there were none
    or the exec failed (then the daemon runs on without them)."""
    if not updates or not sys.executable:
        return
    log.debug("restarting with %s", updates)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(
            sys.executable, [sys.executable, "-m", "aotiserve.server", *argv], {**env, **updates}
        )
    except OSError as exc:
        log.warning("could not restart with %s (%s); running without them", updates, exc)


# sched_setattr(2) has no wrapper in glibc or Python's os: its number per architecture.
_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274, "riscv64": 274, "ppc64le": 355, "s390x": 345}
_FAIR_POLICIES = (os.SCHED_OTHER, os.SCHED_BATCH)


def _sched_attr(policy: int, nice: int, slice_ns: int) -> bytes:
    """struct sched_attr, version 0 (48 bytes): size, policy, flags, nice, priority,
    runtime (a fair thread's slice), deadline, period."""
    return struct.pack("IIQiIQQQ", 48, policy, 0, nice, 0, slice_ns, 0, 0)


def thread_slice_ns(tid: int | str = "self", pid: int | str = "self") -> int | None:
    """The slice the kernel gives a thread (default: the calling one; None where the kernel
    does not say)."""
    path = Path("/proc/thread-self/sched" if tid == "self" else f"/proc/{pid}/task/{tid}/sched")
    try:
        for line in path.read_text().splitlines():
            if line.startswith("se.slice"):
                return int(line.split(":")[1])
    except (OSError, ValueError):
        pass
    return None


def set_time_slice(ms: float) -> int:
    """Asks for ``ms`` of CPU between preemptions for every thread of this process; the
    threads they start inherit it. Each thread keeps its policy and nice value; real-time
    ones are left alone. Returns how many threads took it (0 where unsupported)."""
    nr = _SCHED_SETATTR.get(platform.machine())
    if not ms or nr is None or not sys.platform.startswith("linux"):
        return 0
    syscall = ctypes.CDLL(None, use_errno=True).syscall
    done = 0
    for entry in os.listdir("/proc/self/task"):
        tid = int(entry)
        try:
            policy = os.sched_getscheduler(tid)
            nice = os.getpriority(os.PRIO_PROCESS, tid)
        except OSError:  # the thread ended meanwhile
            continue
        if policy not in _FAIR_POLICIES:
            continue
        attr = ctypes.create_string_buffer(_sched_attr(policy, nice, int(ms * 1e6)))
        if syscall(ctypes.c_long(nr), ctypes.c_long(tid), attr, ctypes.c_uint(0)) == 0:
            done += 1
        else:
            log.debug("time slice of thread %d: %s", tid, os.strerror(ctypes.get_errno()))
    log.debug("time slice %g ms for %d threads", ms, done)
    return done


class HeapTrim:
    """Gives the free pages of malloc's heap back to the system after weights operations.

    A stage, swap, free or failed upload frees a buffer of constants: blocks of megabytes,
    from malloc's heap (its mmap threshold is 32 MiB, see :func:`malloc_env`). Small
    long-lived allocations made meanwhile sit between the freed blocks, so glibc can neither
    reuse the holes whole for the next buffer nor shrink the heap: the daemon's RSS grew by
    about one buffer per stage-and-swap cycle (12-16 MiB for the zoo's ``compute``), for
    good. ``malloc_trim(0)`` hands the free pages back (the heap's addresses stay reserved).
    Weights operations ask for it (:meth:`request`); the daemon's main loop runs it
    (:meth:`run_pending`), off every request's path. A no-op where libc has no malloc_trim.
    """

    def __init__(self) -> None:
        self._pending = threading.Event()
        try:
            self._trim = ctypes.CDLL(None).malloc_trim
            self._trim.argtypes = (ctypes.c_size_t,)
        except (OSError, AttributeError):
            self._trim = None

    def request(self) -> None:
        self._pending.set()

    def run_pending(self) -> bool:
        """Trims if a weights operation asked since the last call; whether it did."""
        if not self._pending.is_set() or self._trim is None:
            return False
        self._pending.clear()
        self._trim(0)
        return True


HEAP = HeapTrim()
