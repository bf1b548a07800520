"""Load generator: one client process that drives one system and prints JSON.

Every system is driven through one client library: grpcio with the generated protobuf
classes, in this interpreter. ``run`` calls aotiserve's Run (aotiserve.v1), ``echo``
sends the very same RunRequest to an echo floor that answers a serialized RunResponse
(so only the server differs), ``oip`` calls Open Inference Protocol ModelInfer
(aotiserve.oip) on aotiserve, KServe or PyTriton alike. ``client`` is aotiserve's own
client library (``aotiserve.client``), what a user would call; ``inproc`` is the
extension called in this process. The config is one JSON argument; the result is the
last line of stdout.

Each client worker owns its own channel (an independent client, as separate
users would be). Concurrency runs either as threads in this process or as
separate processes (``mode``): with threads the client's own GIL caps what a
fast server can show, with processes the clients compete with the server for
the same two cores. Both are honest; the report says which was used.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable

import numpy as np

MAX_MSG = 512 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MSG),
    ("grpc.max_send_message_length", MAX_MSG),
]

# --------------------------------------------------------------------------- calls


def _inputs(cfg: dict) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal(tuple(shape)).astype(np.float32) for shape in cfg["input_shapes"]]


RUN_METHOD = "/aotiserve.v1.ModelRunner/Run"
ECHO_METHOD = "/bench.Echo/Echo"


def _run_call(cfg: dict, method: str = RUN_METHOD) -> Callable[[], None]:
    """A Run through grpcio and the generated protobuf classes: encode a RunRequest per call,
    as any client would, parse the RunResponse, view each output as a numpy array."""
    import grpc

    from aotiserve.v1 import model_runner_pb2 as pb

    channel = grpc.insecure_channel(cfg["target"], options=CHANNEL_OPTIONS)
    call = channel.unary_unary(
        method,
        request_serializer=pb.RunRequest.SerializeToString,
        response_deserializer=pb.RunResponse.FromString,
    )
    arrays = _inputs(cfg)
    model = cfg["model"]

    def run() -> None:
        req = pb.RunRequest(
            model=model,
            inputs=[
                pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=a.shape, data=a.tobytes())
                for a in arrays
            ],
        )
        resp = call(req)
        for t in resp.outputs:
            np.frombuffer(t.data, dtype=np.float32).reshape(tuple(t.shape))

    run.channel = channel
    return run


def _echo_call(cfg: dict) -> Callable[[], None]:
    """The echo floors with the very client work of a Run (``_run_call``): the echo servers
    answer /bench.Echo/Echo with a serialized RunResponse, so only the server differs."""
    return _run_call(cfg, ECHO_METHOD)


def _client_call(cfg: dict) -> Callable[[], None]:
    """aotiserve's own client library (``aotiserve.client``): what a user would call."""
    from aotiserve.client import Client

    client = Client(cfg["target"])
    handle = client.model(cfg["model"])
    arrays = _inputs(cfg)

    def run() -> None:
        handle.run(arrays)

    run.client = client
    return run


def _oip_call(cfg: dict) -> Callable[[], None]:
    """Open Inference Protocol ModelInfer through grpcio and the generated protobuf classes
    (aotiserve.oip: the KServe v2 / Triton protos, package ``inference``), inputs in
    ``raw_input_contents`` and outputs read from ``raw_output_contents``, as tritonclient
    sends and reads them. The same client for aotiserve, KServe and PyTriton."""
    import grpc

    from aotiserve.oip import inference_pb2 as ipb
    from aotiserve.oip import inference_pb2_grpc

    channel = grpc.insecure_channel(cfg["target"], options=CHANNEL_OPTIONS)
    stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
    model = cfg["model"]
    in_names = cfg.get("input_names")
    if not in_names:
        meta = stub.ModelMetadata(ipb.ModelMetadataRequest(name=model))
        in_names = [i.name for i in meta.inputs]
    arrays = _inputs(cfg)
    Tensor = ipb.ModelInferRequest.InferInputTensor

    def run() -> None:
        req = ipb.ModelInferRequest(
            model_name=model,
            inputs=[
                Tensor(name=n, datatype="FP32", shape=a.shape) for n, a in zip(in_names, arrays)
            ],
            raw_input_contents=[a.tobytes() for a in arrays],
        )
        resp = stub.ModelInfer(req)
        if len(resp.raw_output_contents) != len(resp.outputs):
            raise RuntimeError(
                f"ModelInfer answered {len(resp.outputs)} outputs with "
                f"{len(resp.raw_output_contents)} raw_output_contents"
            )
        for o, raw in zip(resp.outputs, resp.raw_output_contents):
            np.frombuffer(raw, dtype=np.float32).reshape(tuple(o.shape))

    run.channel = channel
    return run


_INPROC_CACHE: dict = {}


def _inproc_call(cfg: dict) -> Callable[[], None]:
    """The extension called in this process: the cost of the model alone."""
    import torch

    from aotiserve.runner_ext import load_model

    key = (cfg["package"], cfg.get("num_runners", 1))
    if key not in _INPROC_CACHE:  # one container shared by every thread, as the server has
        _INPROC_CACHE[key] = load_model(cfg["package"], num_runners=cfg.get("num_runners", 1))
    runner = _INPROC_CACHE[key].runner
    arrays = _inputs(cfg)

    def run() -> None:
        outs = runner.run([torch.from_numpy(a) for a in arrays])
        for o in outs:
            o.numpy()

    return run


FACTORIES = {
    "echo": _echo_call,
    "run": _run_call,
    "client": _client_call,
    "oip": _oip_call,
    "inproc": _inproc_call,
}


def make_call(cfg: dict) -> Callable[[], None]:
    return FACTORIES[cfg["kind"]](cfg)


# --------------------------------------------------------------------------- measurement

CALLS = [0]
CHILD_CPU = [0.0]  # CPU seconds of client worker processes (procs mode)


def _cpu_self() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return (
        ru.ru_utime + ru.ru_stime
    )  # every call this process made (warm-ups included): the server's CPU is divided by it


def _pct(sorted_us: list[float], q: float) -> float:
    if not sorted_us:
        return float("nan")
    i = min(len(sorted_us) - 1, max(0, int(round(q * (len(sorted_us) - 1)))))
    return sorted_us[i]


def summarize(lat_us: list[float]) -> dict:
    s = sorted(lat_us)
    return {
        "n": len(s),
        "p50_us": _pct(s, 0.50),
        "p90_us": _pct(s, 0.90),
        "p99_us": _pct(s, 0.99),
        "mean_us": (sum(s) / len(s)) if s else float("nan"),
        "min_us": s[0] if s else float("nan"),
    }


def sequential(call: Callable[[], None], n: int, warmup: int) -> dict:
    CALLS[0] += warmup + n
    for _ in range(warmup):
        call()
    lat = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        call()
        lat.append((clock() - t0) / 1e3)
    return summarize(lat)


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def set_affinity(pids: list[int], cpus: set[int]) -> None:
    """Every thread of ``pids`` onto ``cpus`` (threads made later inherit it from their
    maker); a thread that has gone meanwhile is skipped."""
    for pid in pids:
        for tid in _threads(pid):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, cpus)


@contextlib.contextmanager
def split_cores(server_pids: list[int]):
    """Within it, every thread of ``server_pids`` on the first CPUs this process may use and
    this process on the last, as when the client is another machine; yields whether that
    could be done (2+ CPUs and servers given), and gives every affinity back afterwards."""
    everything = os.sched_getaffinity(0)
    cpus = sorted(everything)
    if len(cpus) < 2 or not server_pids:
        yield False
        return
    set_affinity(server_pids, set(cpus[:-1]))
    set_affinity([os.getpid()], {cpus[-1]})
    try:
        yield True
    finally:
        set_affinity([os.getpid()], everything)
        set_affinity(server_pids, everything)


def sequential_split(call: Callable[[], None], n: int, warmup: int, server_pids: list[int]):
    """:func:`sequential` with the client and the server on separate cores (:func:`split_cores`);
    None with fewer than 2 CPUs or no server. Sharing two cores, the kernel puts a woken
    server thread on the client's core or on the other one as it goes, and the figure follows
    that placement more than the server's work (the tiny Run: 104 µs split, 198 µs on one core;
    the C++ echo 86 and 104)."""
    with split_cores(server_pids) as split:
        return sequential(call, n, warmup) if split else None


# Untimed calls a system makes at the start of each of its blocks: back on its own code and
# data after the others' turns.
SETTLE_CALLS = 5


def take_turns(
    calls: dict[str, Callable[[], None]], n: int, block: int
) -> tuple[dict[str, list[float]], list[dict[str, float]]]:
    """Sequential calls of several systems side by side: each makes ``n`` timed calls in blocks
    of ``block`` (after :data:`SETTLE_CALLS` untimed ones), the systems taking turns block by
    block (forwards, then backwards), so that a machine whose speed drifts over seconds (a
    shared VM) weighs on every system alike. Returns each system's latencies (µs) and, per
    round of turns, each system's p50 in it."""
    lat: dict[str, list[float]] = {name: [] for name in calls}
    blocks: list[dict[str, float]] = []
    clock = time.perf_counter_ns
    for b in range(-(-n // block)):
        p50s = {}
        for name in list(calls) if b % 2 == 0 else list(calls)[::-1]:
            call, mine = calls[name], []
            for _ in range(SETTLE_CALLS):
                call()
            for _ in range(min(block, n - len(lat[name]))):
                t0 = clock()
                call()
                mine.append((clock() - t0) / 1e3)
            lat[name] += mine
            p50s[name] = statistics.median(mine)
        blocks.append(p50s)
    CALLS[0] += len(calls) * (n + SETTLE_CALLS * len(blocks))
    return lat, blocks


def interleaved(cfgs: dict[str, dict], n: int, block: int, warmup: int, server_pids: list[int]):
    """:func:`take_turns` for the systems of ``cfgs``, after ``warmup`` calls each: first with
    the servers (``server_pids``) and this process on separate cores (:func:`split_cores`):
    ``sequential``; then placed by the kernel: ``sequential_shared``. Where the cores cannot
    be split, only the latter, as ``sequential``."""
    calls = {name: make_call(cfg) for name, cfg in cfgs.items()}
    for call in calls.values():
        for _ in range(warmup):
            call()
    CALLS[0] += warmup * len(calls)
    with split_cores(server_pids) as split:
        runs = {"sequential": take_turns(calls, n, block)[0]}
    if split:
        runs["sequential_shared"] = take_turns(calls, n, block)[0]
    return {name: {key: summarize(lat[name]) for key, lat in runs.items()} for name in calls}


def _worker_loop(call: Callable[[], None], start: float, end: float, out: dict) -> None:
    """Calls back to back; counts those that complete inside [start, end)."""
    clock = time.perf_counter
    count = 0
    lat = []
    errors = 0
    calls = 0
    done = []  # completion times, seconds into the window
    while True:
        t0 = clock()
        if t0 >= end:
            break
        calls += 1
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - a failed call is counted, not fatal
            errors += 1
            out.setdefault("error", repr(exc)[:300])
            continue
        t1 = clock()
        if t0 >= start and t1 < end:
            count += 1
            lat.append((t1 - t0) * 1e6)
            done.append(t1 - start)
    out["count"] = count
    out["done"] = done
    out["calls"] = calls
    out["lat"] = lat
    out["errors"] = errors


def _proc_worker(cfg: dict, barrier, start_at, duration: float, warm: float, q) -> None:
    call = make_call(cfg)
    t_end_warm = time.time() + warm
    warm_calls = 0
    while time.time() < t_end_warm:
        call()
        warm_calls += 1
    barrier.wait()
    # Wall-clock start shared by all processes; perf_counter thereafter.
    delay = start_at.value - time.time()
    if delay > 0:
        time.sleep(delay)
    t = time.perf_counter()
    out: dict = {}
    _worker_loop(call, t, t + duration, out)
    out["calls"] += warm_calls
    out["cpu_s"] = _cpu_self()
    q.put(out)


SLICE_S = 0.25


def _median_slice_rate(done: list[float], duration: float) -> float:
    """Completions per second in the median 0.25 s slice of the window.

    Other work on a shared machine stalls a window now and then; the median
    slice ignores such stalls where the window's mean would not.
    """
    n = max(1, int(duration / SLICE_S))
    counts = [0] * n
    for t in done:
        counts[min(n - 1, int(t / SLICE_S))] += 1
    counts.sort()
    mid = counts[n // 2] if n % 2 else (counts[n // 2 - 1] + counts[n // 2]) / 2
    return mid / (duration / n)


def throughput(cfg: dict, concurrency: int, duration: float, mode: str, warm: float) -> dict:
    if mode == "threads" or cfg["kind"] == "inproc":
        calls = [make_call(cfg) for _ in range(concurrency)]
        for c in calls:
            for _ in range(3):
                c()
        CALLS[0] += 3 * concurrency
        outs = [dict() for _ in range(concurrency)]
        # Brief all-threads warm-up so the server's pool is hot, then the window.
        now = time.perf_counter()
        start, end = now + warm, now + warm + duration
        threads = [
            threading.Thread(target=_worker_loop, args=(c, start, end, o), daemon=True)
            for c, o in zip(calls, outs)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        ctx = mp.get_context("spawn")
        barrier = ctx.Barrier(concurrency + 1)
        start_at = ctx.Value("d", 0.0)
        q = ctx.Queue()
        procs = [
            ctx.Process(
                target=_proc_worker, args=(cfg, barrier, start_at, duration, warm, q), daemon=True
            )
            for _ in range(concurrency)
        ]
        for p in procs:
            p.start()
        barrier.wait(timeout=300)
        start_at.value = time.time() + 0.2
        outs = [q.get(timeout=duration + 120) for _ in procs]
        for p in procs:
            p.join(timeout=30)
    lat = [x for o in outs for x in o.get("lat", [])]
    total = sum(o.get("count", 0) for o in outs)
    CALLS[0] += sum(o.get("calls", 0) for o in outs)
    CHILD_CPU[0] += sum(o.get("cpu_s", 0.0) for o in outs)
    res = {
        "concurrency": concurrency,
        "mode": mode if cfg["kind"] != "inproc" else "threads",
        "duration_s": duration,
        "completed": total,
        "rps": total / duration,
        "rps_median_slice": _median_slice_rate(
            [t for o in outs for t in o.get("done", [])], duration
        ),
        "errors": sum(o.get("errors", 0) for o in outs),
        "latency": summarize(lat),
    }
    err = next((o["error"] for o in outs if "error" in o), None)
    if err:
        res["first_error"] = err
    return res


def run(cfg: dict) -> dict:
    if cfg["kind"] == "interleaved":
        systems = interleaved(
            cfg["systems"], cfg["seq_n"], cfg["block"], cfg["warmup"], cfg.get("server_pids", [])
        )
        return {"kind": "interleaved", "systems": systems, "calls_total": CALLS[0]}
    result: dict = {"kind": cfg["kind"], "pid": os.getpid()}
    call = make_call(cfg)  # imports done before the CPU clock starts
    cpu0 = _cpu_self()
    if cfg.get("seq_n"):
        # ``sequential``: on separate cores where the machine has two (the server's own cost);
        # ``sequential_shared``: placed by the kernel, sharing the cores.
        shared = sequential(call, cfg["seq_n"], cfg.get("warmup", 100))
        split = sequential_split(
            call, cfg["seq_n"], cfg.get("warmup", 100), cfg.get("server_pids") or []
        )
        result["sequential"] = split or shared
        if split:
            result["sequential_shared"] = shared
    del call
    tp = []
    for c in cfg.get("concurrency", []):
        tp.append(
            throughput(
                cfg,
                c,
                cfg.get("duration", 2.0),
                cfg.get("mode", "threads"),
                cfg.get("tp_warm", 0.3),
            )
        )
    if tp:
        result["throughput"] = tp
    result["calls_total"] = CALLS[0]
    result["client_cpu_s"] = _cpu_self() - cpu0 + CHILD_CPU[0]
    return result


def main() -> None:
    cfg = json.loads(sys.argv[1])
    if cfg.get("sys_path"):
        sys.path[:0] = cfg["sys_path"]
    out = run(cfg)
    sys.stdout.write("\n" + json.dumps(out) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
