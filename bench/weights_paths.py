"""The three ways weights reach a daemon, side by side in one run, beside the physical
limits measured in the same run (``python -m bench.weights --paths``):

- upload: ``update_constant_buffer(map)`` over gRPC from a client on this host;
- file: ``load_weights(path)``, the daemon reading a safetensors file (page cache) itself;
- gpu-direct (CUDA only): a second process holding the tensors on the same GPU hands them
  over by CUDA IPC handle (``update_constant_buffer(cuda_tensors, gpu_direct=True)``), each
  tensor its own allocation; gpu-direct-flat: the same with the tensors views of one
  allocation (a trainer's flat parameter buffer: one handle to open).

Limits measured in the same run: memcpy of the same bytes (one thread, warm buffers),
XXH3-128 of the same bytes on every core (the tree hash a file or upload goes through) and,
on CUDA, pinned host-to-device and device-to-device copies of the same bytes. Per path:
a full update, then 1% (1 of the model's 100 constants) twice: the first partial after a
full one also brings the inactive buffer's other 99% up to date, the second does not; the
time ratios to the full update, the daemon's peak RSS over each staging relative to
(active + new), and Runs under load across each swap: ``--clients`` checker threads (own
channels) call Run back to back and compare every output with the one the weights version
it reports must give (0 failed, 0 mixed), with the p99 of the Runs that overlapped the swap.
The checkers pause while an update is staged (the staging figures are the path's own
speed) and run across every swap; one more full update per path is staged with them
running (``full_loaded``): staging runs at background priority, so under load it gets
the CPU time Runs leave.

On CUDA the gpu-direct time is the hand-off call as the sending process times it (its
start-up and making the tensors are not counted).

The model is the zoo's ``many_embed`` (100 x Embedding(2622, 1024) float32 = 1 GiB) or,
``--gib 4``, ``many_embed_4g`` (4 GiB). Weights are filled per table with a constant that
differs per table and version, so a mixed read (some tables of each) gives a sum that
matches neither version.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from bench import procs

REPO = Path(__file__).resolve().parent.parent
MODELS = {1: ("many_embed", 2622), 4: ("many_embed_4g", 10488)}
TABLES = 100


def _tables(rows: int, seed: float, only: list[int] | None = None) -> dict[str, np.ndarray]:
    idx = range(TABLES) if only is None else only
    return {
        f"tables.{i}.weight": np.full((rows, 1024), seed + i * 1e-3, dtype=np.float32) for i in idx
    }


def _expected(values: dict[int, float], rows_ids: np.ndarray) -> np.ndarray:
    total = np.float32(0)
    for i in range(TABLES):
        total = total + np.float32(values[i])
    return np.full((len(rows_ids), 1024), total, dtype=np.float32)


def memcpy_gb_s(nbytes: int) -> float:
    """One thread's memcpy of ``nbytes`` (warm buffers), best of 3."""
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def hash_gb_s(nbytes: int) -> float:
    """The version's tree hash (XXH3-128, which every byte staged from a file or an upload
    goes through) of ``nbytes`` in 4 MiB blocks on every core, best of 2."""
    from concurrent.futures import ThreadPoolExecutor

    import xxhash

    block = 4 << 20
    data = np.ones(nbytes, dtype=np.uint8)
    view = memoryview(data)
    best = float("inf")
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        for _ in range(2):
            t0 = time.perf_counter()
            list(
                pool.map(
                    lambda b: xxhash.xxh3_128(view[b : b + block]).digest(), range(0, nbytes, block)
                )
            )
            best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def cuda_limits(nbytes: int, device: str) -> dict:
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    out = {}
    for name, fn in (
        ("h2d_pinned_gb_s", lambda: a.copy_(host, non_blocking=True)),
        ("d2d_gb_s", lambda: b.copy_(a)),
    ):
        fn()
        torch.cuda.synchronize(device)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t0)
        out[name] = nbytes / best / 1e9
    host = a = b = None  # dropped before empty_cache (the lambdas above are done with them)
    torch.cuda.empty_cache()
    return out


class Checker:
    """``clients`` threads calling Run back to back, each on its own channel; every output
    checked against the one of the version it reports."""

    def __init__(self, target: str, name: str, ids: np.ndarray, clients: int = 1):
        from aotiserve.client import Client

        self._clients = [Client(target) for _ in range(clients)]
        self.models = [c.model(name) for c in self._clients]
        self.ids = ids
        self.expected: dict[str, np.ndarray] = {}
        self.calls: list[tuple[float, float, str]] = []
        self.failed = self.mixed = 0
        self.mixed_examples: list[str] = []
        self._stop = threading.Event()
        self._go = threading.Event()
        self._go.set()
        self._idle = threading.Condition()
        self._busy = 0
        self._threads = [
            threading.Thread(target=self._loop, args=(m,), daemon=True) for m in self.models
        ]

    def _loop(self, model) -> None:
        while not self._stop.is_set():
            self._go.wait()
            with self._idle:
                if not self._go.is_set():
                    continue
                self._busy += 1
            t0 = time.perf_counter()
            try:
                out = model.run([self.ids], output_format="numpy")[0]
                version = model.last_weights_version or ""
            except Exception:  # noqa: BLE001 (counted)
                self.failed += 1
                continue
            finally:
                with self._idle:
                    self._busy -= 1
                    self._idle.notify_all()
            t1 = time.perf_counter()
            want = self.expected.get(version)
            if want is None or not np.allclose(out, want, rtol=1e-4, atol=1e-3):
                self.mixed += 1
                if len(self.mixed_examples) < 3:
                    self.mixed_examples.append(f"{version}: {out.ravel()[:2]}")
            self.calls.append((t0, t1 - t0, version))

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def pause(self) -> None:
        """Returns once no checker is in a Run, and none starts one until ``resume()``."""
        with self._idle:
            self._go.clear()
            self._idle.wait_for(lambda: self._busy == 0)

    def resume(self) -> None:
        self._go.set()

    def stop(self) -> None:
        self._stop.set()
        self._go.set()
        for t in self._threads:
            t.join()
        for c in self._clients:
            c.close()

    def overlapping(self, lo: float, hi: float) -> list[float]:
        return [lat for t0, lat, _ in list(self.calls) if t0 <= hi and t0 + lat >= lo]

    def quiet(self, seconds: float) -> list[float]:
        hi = time.perf_counter()
        time.sleep(seconds)
        return self.overlapping(hi, hi + seconds)


def _p99(lat: list[float]) -> float:
    if not lat:
        return float("nan")
    s = sorted(lat)
    return s[min(len(s) - 1, int(0.99 * len(s)))]


_SENDER = r"""
import sys, time, json, torch
from aotiserve.client import Client
target, model, rows, seed, device, partial, layout = sys.argv[1:8]
rows, seed, partial = int(rows), float(seed), partial == "1"
idx = [0] if partial else range(100)
if layout == "flat":  # views of one allocation (a trainer's flat parameter buffer)
    flat = torch.empty(len(idx) * rows * 1024, device=device)
    tensors = {f"tables.{i}.weight": flat[j * rows * 1024 : (j + 1) * rows * 1024]
               .view(rows, 1024).fill_(seed + i * 1e-3) for j, i in enumerate(idx)}
else:  # one allocation per tensor
    tensors = {f"tables.{i}.weight": torch.full((rows, 1024), seed + i * 1e-3, device=device)
               for i in idx}
torch.cuda.synchronize()
m = Client(target).model(model)
t0 = time.perf_counter()
v = m.update_constant_buffer(tensors, True, not partial, gpu_direct=True)
print(json.dumps({"seconds": time.perf_counter() - t0, "version": v.id}))
"""


GPU_DIRECT_FLAT = "gpu-direct-flat"
GPU_DIRECT = ("gpu-direct", GPU_DIRECT_FLAT)


def _paths(cuda: bool) -> tuple[str, ...]:
    return ("upload", "file") + (GPU_DIRECT if cuda else ())


class _stager:
    """How one path stages ``touched`` tables filled from ``seed``: prepare (untimed), run."""

    def __init__(self, path, model, target, name, rows, device, files, res):
        self.path, self.model, self.target, self.name = path, model, target, name
        self.rows, self.device, self.files, self.res = rows, device, files, res
        self.seconds: float | None = None  # set where the call is timed by the sender

    def prepare(self, seed: float, touched: list[int]):
        if self.path == "upload":
            return _tables(self.rows, seed, touched)
        if self.path == "file":
            from safetensors.numpy import save_file

            path = self.files / f"w-{seed:.0f}.safetensors"
            save_file(_tables(self.rows, seed, touched), str(path))
            # Read once: the load then reads it from the page cache.
            subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
            return path
        return None

    def run(self, prepared, seed: float, touched: list[int]) -> str:
        full = len(touched) == TABLES
        if self.path == "upload":
            return self.model.update_constant_buffer(prepared, True, full).id
        if self.path == "file":
            return self.model.load_weights(prepared, validate_full_updates=full).id
        # gpu-direct: a second process makes the tensors on the GPU and hands them over;
        # the whole process is timed here, the call alone by the sender.
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                _SENDER,
                self.target,
                self.name,
                str(self.rows),
                str(seed),
                self.device,
                "0" if full else "1",
                "flat" if self.path == GPU_DIRECT_FLAT else "separate",
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-12:])
            raise RuntimeError(f"the gpu-direct sender exited with {proc.returncode}:\n{tail}")
        sent = json.loads(proc.stdout.strip().splitlines()[-1])
        self.seconds = sent["seconds"]
        return sent["version"]

    def cleanup(self, prepared) -> None:
        if self.path == "file":
            prepared.unlink()


def main(args) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    import model_zoo  # noqa: E402

    from aotiserve.client import Client

    name, rows = MODELS[args.gib]
    device = args.device
    cuda = device.startswith("cuda")
    package = model_zoo.compiled(name, "cuda" if cuda else "cpu")
    workdir = procs.tmpdir("aotiserve-bench-paths-")
    files = workdir / "files"
    files.mkdir()
    server = procs.start_aotiserve(
        workdir,
        {name: package},
        extra_args=["--reserve-inactive-buffer", "--allowed-root", str(files), "--devices", device],
    )
    table_bytes = rows * 1024 * 4
    nbytes = TABLES * table_bytes
    out: dict = {
        "model": f"{name} ({TABLES} x Embedding({rows}, 1024) float32, {nbytes / 2**30:.2f} GiB)",
        "device": device,
        "cpus": os.cpu_count(),
        "run_clients": args.clients,
        "loadavg_1m_start": os.getloadavg()[0],
        "rounds": [],
    }
    try:
        client = Client(server.target)
        model = client.model(name)
        ids = np.array([0, 1, rows - 1, 7], dtype=np.int64)
        checker = Checker(server.target, name, ids, args.clients)
        checker.expected["initial"] = model.run([ids], output_format="numpy")[0]
        checker.start()
        seed = 1.0
        current: dict[int, float] = {}  # per table, the value serving (after a full update)
        for r in range(args.rounds):
            res: dict = {"round": r + 1}
            res["memcpy_gb_s"] = memcpy_gb_s(nbytes)
            res["hash_gb_s"] = hash_gb_s(nbytes)
            if cuda:
                res.update(cuda_limits(nbytes, device))
            res["quiet_p99_ms"] = _p99(checker.quiet(1.0)) * 1e3
            for path in _paths(cuda):
                try:
                    # A full update, then the same 1% twice: the first partial after a full one
                    # also brings the inactive buffer's other 99% up to date (it holds the
                    # version before the full one); the second one finds them current.
                    for kind in ("full", "partial_after_full", "partial", "full_loaded"):
                        partial = kind.startswith("partial")
                        seed += 1.0
                        touched = [0] if partial else list(range(TABLES))
                        stage = _stager(path, model, server.target, name, rows, device, files, res)
                        prepared = stage.prepare(seed, touched)  # untimed: writing the file
                        hwm = procs.reset_peak_memory(server.pid)
                        rss0 = procs.status_kib(server.pid, "VmRSS") * 1024
                        if kind != "full_loaded":
                            checker.pause()
                        t0 = time.perf_counter()
                        version = stage.run(prepared, seed, touched)
                        t1 = time.perf_counter()
                        checker.resume()
                        if stage.seconds is not None:  # the hand-off call, not the sender's start
                            t0, t1 = 0.0, stage.seconds
                        peak = procs.status_kib(server.pid, "VmHWM") * 1024 if hwm else 0
                        current.update({i: seed + i * 1e-3 for i in touched})
                        checker.expected[version] = _expected(current, ids)
                        s0 = time.perf_counter()
                        model.swap_constant_buffer()
                        s1 = time.perf_counter()
                        time.sleep(0.05)  # the Runs overlapping the swap finish
                        stage.cleanup(prepared)
                        key = f"{path}_{kind}"
                        res[f"{key}_s"] = t1 - t0
                        res[f"{key}_gb_s"] = len(touched) * table_bytes / (t1 - t0) / 1e9
                        res[f"{key}_swap_ms"] = (s1 - s0) * 1e3
                        res[f"{key}_p99_overlapping_swap_ms"] = (
                            _p99(checker.overlapping(s0, s1)) * 1e3
                        )
                        res[f"{key}_runs_overlapping_swap"] = len(checker.overlapping(s0, s1))
                        res[f"{key}_rss_peak_ratio"] = peak / rss0 if peak else float("nan")
                    res[f"{path}_partial_over_full"] = (
                        res[f"{path}_partial_s"] / res[f"{path}_full_s"]
                    )
                    res[f"{path}_partial_after_full_over_full"] = (
                        res[f"{path}_partial_after_full_s"] / res[f"{path}_full_s"]
                    )
                except Exception as e:  # noqa: BLE001 (one path's failure is reported, the others run)
                    res[f"{path}_error"] = f"{type(e).__name__}: {e}"
                    print(f"{path}: {res[f'{path}_error']}", file=sys.stderr, flush=True)
            if "file_full_gb_s" in res:
                res["file_over_memcpy"] = res["file_full_gb_s"] / res["memcpy_gb_s"]
                res["file_over_hash"] = res["file_full_gb_s"] / res["hash_gb_s"]
                if cuda:
                    res["file_over_h2d"] = res["file_full_gb_s"] / res["h2d_pinned_gb_s"]
            for path in GPU_DIRECT if cuda else ():
                if f"{path}_full_gb_s" in res:
                    res[f"{path}_over_d2d"] = res[f"{path}_full_gb_s"] / res["d2d_gb_s"]
            res["loadavg_1m"] = os.getloadavg()[0]
            out["rounds"].append(res)
        checker.stop()
        out["runs"] = len(checker.calls)
        out["runs_failed"] = checker.failed
        out["runs_mixed"] = checker.mixed
        out["mixed_examples"] = checker.mixed_examples
        client.close()
    finally:
        server.stop()
    return out


def report(out: dict) -> None:
    print(
        f"model: {out['model']} on {out['device']}; {out['cpus']} cpus; Runs checked "
        f"({out.get('run_clients', 1)} clients): {out['runs']}, failed {out['runs_failed']}, "
        f"mixed {out['runs_mixed']}"
    )
    paths = _paths(out["device"].startswith("cuda"))
    for r in out["rounds"]:
        limits = f"memcpy {r['memcpy_gb_s']:.2f} GB/s, XXH3 all cores {r['hash_gb_s']:.2f} GB/s"
        if "h2d_pinned_gb_s" in r:
            limits += f", H2D pinned {r['h2d_pinned_gb_s']:.2f}, D2D {r['d2d_gb_s']:.1f} GB/s"
        print(
            f"round {r['round']} ({limits}; load {r['loadavg_1m']:.1f}; quiet Run p99 "
            f"{r['quiet_p99_ms']:.2f} ms)"
        )
        print(
            f"  {'path':<15} {'full s':>7} {'GB/s':>6} {'1% s':>7} {'1%/full':>7} "
            f"{'1%* s':>7} {'1%*/full':>8} {'swap ms':>7} {'p99 swap':>8} {'RSS x':>6} "
            f"{'loaded GB/s':>11}"
        )
        for p in paths:
            if f"{p}_error" in r:
                print(f"  {p:<15} failed: {r[f'{p}_error']}")
                continue
            print(
                f"  {p:<15} {r[f'{p}_full_s']:>7.3f} {r[f'{p}_full_gb_s']:>6.2f} "
                f"{r[f'{p}_partial_s']:>7.3f} {r[f'{p}_partial_over_full']:>7.3f} "
                f"{r[f'{p}_partial_after_full_s']:>7.3f} "
                f"{r[f'{p}_partial_after_full_over_full']:>8.3f} "
                f"{r[f'{p}_full_swap_ms']:>7.1f} "
                f"{r[f'{p}_full_p99_overlapping_swap_ms']:>6.2f}ms "
                f"{r[f'{p}_full_rss_peak_ratio']:>6.3f} "
                f"{r[f'{p}_full_loaded_gb_s']:>11.2f}"
            )
        line = ""
        if "file_over_memcpy" in r:
            line = f"  file / memcpy {r['file_over_memcpy']:.2f}, "
            line += f"file / XXH3 {r['file_over_hash']:.2f}"
        if "file_over_h2d" in r:
            line += f", file / H2D {r['file_over_h2d']:.2f}"
        for p in GPU_DIRECT:
            if f"{p}_over_d2d" in r:
                line += f", {p} / D2D {r[f'{p}_over_d2d']:.3f}"
        if line:
            print(line)
    print(
        "1%: one of the 100 constants after another 1% update; 1%*: the first 1% after a "
        "full update (it also copies the 99% the full update changed into the inactive buffer)"
    )
    print(
        "p99 swap: Runs overlapping the swap after the full update; Runs are checked against "
        "the version each reports (failed/mixed above)"
    )
    print(
        "RSS x: daemon peak RSS over the full staging / RSS before it (the inactive buffer "
        "is reserved: active + new)"
    )
    print(
        "full, 1%, 1%*: staged while the Run checkers pause; loaded GB/s: another full "
        "update staged while they run (staging yields the cores to Runs)"
    )
