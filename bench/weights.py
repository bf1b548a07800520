"""Hot weight swap bench: a 1 GiB update staged through the real client into a daemon.

One command, one daemon (a subprocess on loopback serving the zoo's ``big_embed``:
4 x Embedding(65536, 1024) float32 = 1 GiB of weights, a row gather per Run), and
every ratio measured side by side in the same run::

    .venv/bin/python -m bench.weights [--json] [--rounds 2]
    .venv/bin/python -m bench.weights --paths [--device cuda:0] [--gib 4]   (issue 19)

Per round (round 1 is the first upload; later rounds stage into the buffer the previous
swap left inactive). The daemon reserves the inactive buffer at load
(``--reserve-inactive-buffer``), so round 1 writes in place as later rounds do;
``--no-reserve`` leaves that to the first upload, which then also pays for fresh memory
(on the 2-core test VM ~2.2 s per GiB never touched before):

- staging throughput: bytes / wall time of ``update_constant_buffer(map,
  use_inactive=True, validate_full_updates=True)`` on the real client;
- swap time: wall time of ``swap_constant_buffer()``;
- peak RSS: the daemon's VmHWM over the staging (reset before it through
  ``/proc/<pid>/clear_refs``; a 5 ms RSS sampler backs it up where that is refused),
  relative to (RSS before the staging + the bytes of new weights a buffer still has
  to grow by): round 1 expects active + new (with the reservation: already there), later rounds
  active + inactive (no growth);
- Run p99 during stage + swap relative to p99 over an equally long quiet window just
  before, from one client thread calling Run continuously on 4 ids;
- Run p99 while the buffers flip back and forth (100 rollbacks back to back, each one
  swap of the container's buffers) relative to the same quiet p99: the swap alone;
- p99 of the Runs that overlapped a swap call, over 300 swaps 20 ms apart (one swap at
  a time, as in production) relative to the same quiet p99;
- the controls for it, taking turns with the swaps: the same with ListModels in place of
  the swap (a read-only RPC of about the same cost), i.e. what any concurrent RPC costs a
  Run on these shared cores, and the ratio of the two p99s, what the swap adds beyond that;
  and the same with a busy loop in this process as long as a swap takes, no RPC at all:
  what any CPU work beside the Runs costs them here, however low its priority.

Targets (issue 4): >= 1 GB/s staging, <= 1.1x RSS, <= 2x p99. The 1-minute load
average is printed beside the figures: other work on the machine moves them.

The admin side (this process: uploads, swaps, ListModels) runs, on a deployment, on
another machine. Here it shares the 2 cores with the daemon and the Run client, so once
those are started it steps aside (``--admin``): by default to SCHED_IDLE, which runs it
on CPU time nothing else wants and lets a waking Run preempt it at once. Niceness alone
is not enough: a nice-10 busy loop of 1.5 ms in this process held the Runs overlapping
it to 1.6-1.9 ms at the median (quiet: 0.4 ms), as a waking thread queued behind it for
its time slice.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

from bench import procs

REPO = Path(__file__).resolve().parent.parent
MODEL = "big_embed"
TARGETS = {"staging_gb_s": 1.0, "rss_ratio": 1.1, "p99_ratio": 2.0}


def _cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Peak VmRSS of a process, sampled every ``period`` seconds on a thread."""

    def __init__(self, pid: int, period: float = 0.005):
        self.pid, self.period = pid, period
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, procs.status_kib(self.pid, "VmRSS"))
            self._stop.wait(self.period)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, procs.status_kib(self.pid, "VmRSS"))


def _run_loop(target: str, ids: list[int], buf, count, errors, paused, stop) -> None:
    """The Run client process: Run back to back, (start, latency) per call into ``buf``."""
    from aotiserve.client import Client

    # Its garbage collector would pause the Run client at random (quiet and busy windows
    # alike): off; the daemon keeps its own.
    gc.disable()
    with Client(target) as client:
        model = client.model(MODEL)
        x = np.array(ids, dtype=np.int64)
        calls = np.frombuffer(buf, dtype=np.float64).reshape(-1, 2)
        while not stop.is_set() and count.value < len(calls):
            if paused.is_set():
                time.sleep(0.001)
                continue
            t0 = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
            try:
                model.run([x], output_format="numpy")
            except Exception:
                errors.value += 1
            calls[count.value] = (t0, time.perf_counter() - t0)
            count.value += 1


class RunLoop:
    """One client calling Run back to back in a process of its own, as real clients are:
    the bench's uploads and swaps (this process) never hold its GIL. Keeps (start,
    latency) per call in shared memory."""

    CAPACITY = 1 << 21  # calls

    def __init__(self, target: str, ids: np.ndarray):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._buf = ctx.RawArray("d", 2 * self.CAPACITY)
        self._count = ctx.RawValue("q", 0)
        self._errors = ctx.RawValue("q", 0)
        self._paused, self._stop = ctx.Event(), ctx.Event()
        self._proc = ctx.Process(
            target=_run_loop,
            daemon=True,
            args=(
                target,
                [int(i) for i in ids],
                self._buf,
                self._count,
                self._errors,
                self._paused,
                self._stop,
            ),
        )

    @property
    def errors(self) -> int:
        return self._errors.value

    def start(self) -> None:
        self._proc.start()
        deadline = time.monotonic() + 60
        while self._count.value < 10:  # warmed up: its first calls are done
            if not self._proc.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the Run client process did not start calling")
            time.sleep(0.01)

    def pause(self, paused: bool) -> None:
        (self._paused.set if paused else self._paused.clear)()

    def stop(self) -> None:
        self._stop.set()
        self._proc.join(30)

    def window(self, lo: float, hi: float) -> list[float]:
        """Latencies (s) of calls that overlapped [lo, hi]."""
        calls = np.frombuffer(self._buf, dtype=np.float64).reshape(-1, 2)[: self._count.value]
        t0, lat = calls[:, 0], calls[:, 1]
        return lat[(t0 <= hi) & (t0 + lat >= lo)].tolist()


def _p99(lat: list[float]) -> float:
    if not lat:
        return float("nan")
    s = sorted(lat)
    return s[min(len(s) - 1, int(0.99 * len(s)))]


def _loadavg() -> float:
    return os.getloadavg()[0]


def copy_gb_s(nbytes: int = 256 << 20) -> float:
    """One thread's memcpy rate right now (warm buffers): what the machine's load leaves
    for each copy the staging path makes."""
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    t0 = time.perf_counter()
    np.copyto(dst, src)
    return nbytes / (time.perf_counter() - t0) / 1e9


def new_weights(names: list[str], shapes: dict[str, tuple], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(shapes[n], dtype=np.float32) for n in names}


def busy(seconds: float) -> None:
    """Keeps this thread on a core for ``seconds``."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def step_aside(how: str) -> None:
    """Lowers this process's claim on the cores (every thread it has; later ones inherit):
    ``idle`` SCHED_IDLE, ``nice`` niceness 10, ``share`` nothing."""
    for tid in (int(t) for t in os.listdir("/proc/self/task")):
        if how == "idle":
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        elif how == "nice":
            os.setpriority(os.PRIO_PROCESS, tid, 10)


def _overlapping(loop: RunLoop, calls: dict, times: int, spacing_s: float = 0.02) -> dict:
    """Latencies of the Runs that overlapped each of ``calls`` ({name: call}), the calls
    taking turns ``times`` times over, ``spacing_s`` apart: each sees the same conditions."""
    spans: dict = {name: [] for name in calls}
    for _ in range(times):
        for name, call in calls.items():
            a = time.perf_counter()
            call()
            spans[name].append((a, time.perf_counter()))
            time.sleep(spacing_s)
    # Only now: picking the Runs out of the loop's record is CPU work of this process, which
    # done between calls would itself delay the Runs around the next call.
    time.sleep(0.05)
    return {name: [x for a, b in ab for x in loop.window(a, b)] for name, ab in spans.items()}


def bench_round(
    client,
    pid: int,
    loop: RunLoop,
    weights: dict[str, np.ndarray],
    growth: int,
    quiet_s: float,
    flips: int = 50,
    spaced: int = 300,
) -> dict:
    model = client.model(MODEL)
    nbytes = sum(a.nbytes for a in weights.values())
    # Quiet window: the same Run loop with nothing else going on.
    time.sleep(quiet_s)
    quiet_hi = time.perf_counter()
    quiet = loop.window(quiet_hi - quiet_s, quiet_hi)
    rss_before = procs.status_kib(pid, "VmRSS") * 1024
    load = _loadavg()
    memcpy = copy_gb_s()
    hwm_reset = procs.reset_peak_memory(pid)

    def stage():
        return model.update_constant_buffer(weights, use_inactive=True, validate_full_updates=True)

    # Staging throughput and peak memory: the upload alone (the Run client paused).
    loop.pause(True)
    with RssSampler(pid) as sampler:
        cpu0 = (_cpu_s(pid), _cpu_s(os.getpid()))
        t0 = time.perf_counter()
        stage()
        t1 = time.perf_counter()
        cpu1 = (_cpu_s(pid), _cpu_s(os.getpid()))
    hwm = procs.status_kib(pid, "VmHWM") * 1024 if hwm_reset else 0
    peak = max(hwm, sampler.peak_kib * 1024)
    loop.pause(False)
    time.sleep(0.2)
    # The same upload again (restaging the inactive buffer) while Runs go on, then the swap.
    t2 = time.perf_counter()
    version = stage()
    t3 = time.perf_counter()
    s0 = time.perf_counter()
    active = model.swap_constant_buffer()
    s1 = time.perf_counter()
    time.sleep(0.05)  # let the calls that overlapped the swap finish
    during = loop.window(t2, s1)
    # The flip alone, many times over: rollbacks back and forth between the two buffers
    # (an even number, so the new weights serve at the end), Run going on meanwhile.
    f0 = time.perf_counter()
    for _ in range(2 * flips):
        model.rollback_constant_buffer()
    f1 = time.perf_counter()
    time.sleep(0.05)
    flipping = loop.window(f0, f1)
    # One swap at a time, as in production: Runs that overlapped a flip call, over
    # ``spaced`` flips 20 ms apart (after the back-to-back ones have settled). Two controls
    # take turns with them: a read-only RPC of about the same cost (ListModels), i.e. what
    # any concurrent RPC costs a Run on these shared cores, and a busy loop as long as a
    # flip with no RPC, what any CPU work beside the Runs costs them.
    time.sleep(0.5)
    flip_s = (f1 - f0) / (2 * flips)
    spaced = _overlapping(
        loop,
        {
            "swap": model.rollback_constant_buffer,
            "list": client.list_models,
            "busy": lambda: busy(flip_s),
        },
        spaced,
    )
    overlapping, control = spaced["swap"], spaced["list"]
    expected = rss_before + growth
    return {
        "bytes": nbytes,
        "staging_s": t1 - t0,
        "staging_gb_s": nbytes / (t1 - t0) / 1e9,
        "staging_under_runs_s": t3 - t2,
        "staging_under_runs_gb_s": nbytes / (t3 - t2) / 1e9,
        "swap_ms": (s1 - s0) * 1e3,
        # CPU seconds each side spent on the staging (the client side includes the Run
        # loop and the RSS sampler threads): what the GB/s would be with cores to spare.
        "daemon_cpu_s": cpu1[0] - cpu0[0],
        "client_cpu_s": cpu1[1] - cpu0[1],
        "rss_before_mib": rss_before / 2**20,
        "rss_peak_mib": peak / 2**20,
        "rss_expected_mib": expected / 2**20,
        "rss_ratio": peak / expected,
        "rss_source": "VmHWM+sampler" if hwm_reset else "sampler",
        "p99_quiet_ms": _p99(quiet) * 1e3,
        "p99_swap_ms": _p99(during) * 1e3,
        "p99_ratio": _p99(during) / _p99(quiet),
        "runs_quiet": len(quiet),
        "runs_during": len(during),
        # Run p99 while the buffers flip (2 x flips rollbacks back to back): the swap itself.
        "flips": 2 * flips,
        "flip_ms": (f1 - f0) * 1e3 / (2 * flips),
        "p99_flips_ms": _p99(flipping) * 1e3,
        "p99_flip_ratio": _p99(flipping) / _p99(quiet),
        "runs_flipping": len(flipping),
        "p99_one_swap_ms": _p99(overlapping) * 1e3,
        "p99_one_swap_ratio": _p99(overlapping) / _p99(quiet),
        "runs_overlapping_swaps": len(overlapping),
        "p99_one_list_ms": _p99(control) * 1e3,
        "p99_one_list_ratio": _p99(control) / _p99(quiet),
        # What the swap itself adds: Runs overlapping a swap against Runs overlapping the
        # control RPC, both with the admin client at work.
        "p99_swap_over_list": _p99(overlapping) / _p99(control),
        "runs_overlapping_lists": len(control),
        # No RPC: a busy loop as long as a flip in this (stepped-aside) process.
        "p99_one_busy_ms": _p99(spaced["busy"]) * 1e3,
        "p99_one_busy_ratio": _p99(spaced["busy"]) / _p99(quiet),
        "loadavg_1m": load,
        "memcpy_gb_s": memcpy,
        "version": version.id if version else "",
        "active_after": active.id if active else "",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--rounds", type=int, default=2, help="uploads (round 1 is the first)")
    parser.add_argument("--quiet-s", type=float, default=2.0, help="quiet p99 window (s)")
    parser.add_argument("--chunk-bytes", type=int, default=None, help="client upload chunk size")
    parser.add_argument(
        "--admin",
        choices=("idle", "nice", "share"),
        default="idle",
        help="how this process, the admin side (uploads, swaps, ListModels), steps "
        "aside once the daemon and the Run client are started (on a deployment "
        "it runs on another machine): SCHED_IDLE (default), niceness 10, or "
        "not at all",
    )
    parser.add_argument(
        "--no-reserve",
        dest="reserve",
        action="store_false",
        help="leave the inactive buffer to the first upload (no --reserve-inactive-buffer)",
    )
    parser.add_argument(
        "--weights-dir",
        action="store_true",
        help="give the daemon a --weights-dir (persisting each staged version)",
    )
    parser.add_argument(
        "--paths",
        action="store_true",
        help="instead: upload, file pull and (CUDA) GPU-direct side by side, full "
        "and 1%% partial, with memcpy/H2D/D2D limits (bench/weights_paths.py)",
    )
    parser.add_argument(
        "--gib",
        type=int,
        choices=(1, 4),
        default=1,
        help="--paths: model size (many_embed, many_embed_4g)",
    )
    parser.add_argument("--device", default="cpu", help="--paths: where the model runs (cuda:0)")
    parser.add_argument(
        "--clients",
        type=int,
        default=1,
        help="--paths: Run clients checking every output across the swaps",
    )
    args = parser.parse_args(argv)
    if args.paths:
        from bench import weights_paths

        out = weights_paths.main(args)
        if args.json:
            print(json.dumps(out, indent=2))
        else:
            weights_paths.report(out)
        return 0

    sys.path.insert(0, str(REPO / "tests"))
    import model_zoo  # noqa: E402  (the test zoo is the bench's zoo too)

    from aotiserve.client import Client

    package = model_zoo.compiled(MODEL)
    workdir = procs.tmpdir("aotiserve-bench-weights-")
    extra = ["--weights-dir", str(workdir / "weights")] if args.weights_dir else []
    if args.reserve:
        extra.append("--reserve-inactive-buffer")
    server = procs.start_aotiserve(workdir, {MODEL: package}, extra_args=extra)
    results: dict = {
        "model": f"{MODEL} (4 x Embedding(65536, 1024) float32, 1 GiB)",
        "cpus": os.cpu_count(),
        "chunk_bytes": args.chunk_bytes,
        "admin": args.admin,
        "reserve_inactive_buffer": args.reserve,
        "rounds": [],
    }
    try:
        kw = {"chunk_bytes": args.chunk_bytes} if args.chunk_bytes else {}
        client = Client(server.target, **kw)
        handle = client.model(MODEL)
        fqns = sorted(handle.get_constant_names_to_original_fqns().values())
        shapes = {f: (65536, 1024) for f in fqns}
        ids = np.array([0, 1, 65535, 12345], dtype=np.int64)
        loop = RunLoop(server.target, ids)
        loop.start()
        step_aside(args.admin)
        buffer_bytes = sum(int(np.prod(s)) * 4 for s in shapes.values())
        for r in range(args.rounds):
            weights = new_weights(fqns, shapes, seed=r + 1)
            # Round 1 grows the daemon by the inactive buffer unless reserved; later ones reuse it.
            growth = buffer_bytes if r == 0 and not args.reserve else 0
            res = bench_round(client, server.pid, loop, weights, growth, args.quiet_s)
            got = handle.run([ids], output_format="numpy")[0]
            want = sum(w[ids] for w in weights.values())
            res["served_new_weights"] = bool(np.allclose(got, want, rtol=1e-5, atol=1e-5))
            res["round"] = r + 1
            results["rounds"].append(res)
            del weights
        loop.stop()
        results["run_errors"] = loop.errors
        client.close()
    finally:
        server.stop()
    last = results["rounds"][-1]
    results["summary"] = {
        k: last[k]
        for k in (
            "staging_gb_s",
            "swap_ms",
            "rss_ratio",
            "p99_ratio",
            "p99_flip_ratio",
            "p99_one_swap_ratio",
            "p99_one_list_ratio",
            "p99_swap_over_list",
            "p99_one_busy_ratio",
        )
    }
    results["targets"] = TARGETS
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"model: {results['model']}; {results['cpus']} cpus; Run errors: {results['run_errors']}")
    hdr = (
        f"{'round':>5} {'GB/s':>6} {'stage s':>8} {'swap ms':>8} {'RSS before':>10} {'peak':>8} "
        f"{'expect':>8} {'RSS x':>6} {'p99 quiet':>9} {'p99 swap':>9} {'p99 x':>6} {'flip x':>6} {'swap x':>6} "
        f"{'list x':>6} {'s/l':>5} {'busy x':>6} {'load1m':>6} {'memcpy':>6} {'cpu d/c':>7} ok"
    )
    print(hdr)
    for r in results["rounds"]:
        print(
            f"{r['round']:>5} {r['staging_gb_s']:>6.2f} {r['staging_s']:>8.2f} {r['swap_ms']:>8.1f} "
            f"{r['rss_before_mib']:>9.0f}M {r['rss_peak_mib']:>7.0f}M {r['rss_expected_mib']:>7.0f}M "
            f"{r['rss_ratio']:>6.3f} {r['p99_quiet_ms']:>7.1f}ms {r['p99_swap_ms']:>7.1f}ms "
            f"{r['p99_ratio']:>6.2f} {r['p99_flip_ratio']:>6.2f} {r['p99_one_swap_ratio']:>6.2f} "
            f"{r['p99_one_list_ratio']:>6.2f} {r['p99_swap_over_list']:>5.2f} {r['p99_one_busy_ratio']:>6.2f} {r['loadavg_1m']:>6.1f} {r['memcpy_gb_s']:>6.2f} "
            f"{r['daemon_cpu_s']:>4.1f}/{r['client_cpu_s']:<4.1f} {r['served_new_weights']}"
        )
    print("cpu d/c: CPU seconds the daemon / the bench client spent during the staging")
    print("memcpy: one thread's copy rate (GB/s) just before the round, on this machine's load")
    print(
        "p99 x: Run p99 during stage + swap / quiet; flip x: during 100 back-to-back buffer flips / quiet;"
    )
    print("swap x: p99 of the Runs that overlapped a swap, 300 swaps 20 ms apart / quiet")
    print(
        "list x: the same with ListModels in place of the swap (what any concurrent RPC costs a Run here),"
    )
    print("  taking turns with the swaps; s/l: swap x / list x, what the swap adds beyond any RPC;")
    print("busy x: the same with a busy loop as long as a flip in the admin process (no RPC)")
    print("targets: staging >= 1 GB/s, RSS <= 1.1x (active + new), p99 during swap <= 2x quiet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
