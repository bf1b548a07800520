"""Soak: N minutes of mixed load against a daemon process, watching errors, p99 and memory.

    python -m bench.soak --minutes 10 [--threads 4] [--interval-s 15] [--json out.json]

One daemon (``python -m aotiserve.server``, its own process, committed weights
persisted in a temporary ``--weights-dir``) serves ``mlp`` and ``two_io``.
Against it, at once:

- ``--threads`` inference threads call Run (native) and ModelInfer (Open
  Inference Protocol) on both models and check every answer: ``mlp`` must
  equal eager with either the packaged weights or the pushed ones (weights flip
  under load), ``two_io`` must equal eager;
- one weights thread cycles stage → swap → rollback → free on ``mlp``, now and
  then a stage that is discarded unswapped, every ``--swap-every-s``;
- a share of requests (``--bad-share``) are malformed on purpose (wrong shape,
  dtype, byte count, unknown model, batch beyond the shape guard, bad upload
  header, a path outside the allowed roots, bytes that are no message at all),
  each expecting its status code.

Anything else — an unexpected code, a wrong result, a dead daemon — counts as
an unexpected error. Every ``--interval-s`` a line shows requests, errors,
p50/p99 of good inference calls and the daemon's RSS. At the end: RSS drift
after warm-up, ``(last RSS - RSS at the end of warm-up) / RSS at warm-up``,
and the largest RSS after warm-up. Exit status 1 if any unexpected error.

Latency figures depend on whatever else runs on the machine; errors and
memory drift are the point.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from aotiserve.oip import inference_pb2 as ipb
from aotiserve.oip import inference_pb2_grpc as ipb_grpc
from aotiserve.server import runner_codec
from aotiserve.server import tensor_codec as codec
from aotiserve.v1 import model_runner_pb2 as pb
from aotiserve.v1 import model_runner_pb2_grpc as pb_grpc

from . import procs

log = logging.getLogger("bench.soak")
CODE = grpc.StatusCode


def _zoo():
    sys.path.insert(0, str(procs.REPO / "tests"))
    import model_zoo  # noqa: E402  (the test zoo is the bench's zoo too)

    return model_zoo


def _close(a, b) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and torch.allclose(x, y, atol=1e-5, rtol=1e-4) for x, y in zip(a, b)
    )


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


@dataclass
class Interval:
    """What happened in one reporting interval (guarded by Stats.lock)."""

    good: int = 0
    bad: int = 0
    weight_ops: int = 0
    unexpected: int = 0
    latencies_ms: list[float] = field(default_factory=list)


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = Interval()
        self.unexpected: Counter = Counter()
        self.samples: list[str] = []  # first few unexpected errors, verbatim
        self.totals: Counter = Counter()

    def good(self, ms: float) -> None:
        with self.lock:
            self.now.good += 1
            self.now.latencies_ms.append(ms)
            self.totals["good"] += 1

    def bad(self) -> None:
        with self.lock:
            self.now.bad += 1
            self.totals["bad"] += 1

    def weight_op(self, op: str) -> None:
        with self.lock:
            self.now.weight_ops += 1
            self.totals[f"weights_{op}"] += 1

    def error(self, kind: str, detail: str) -> None:
        with self.lock:
            self.now.unexpected += 1
            self.unexpected[kind] += 1
            if len(self.samples) < 20:
                self.samples.append(f"{kind}: {detail}"[:500])
        log.error("unexpected: %s: %s", kind, detail[:300])

    def take(self) -> Interval:
        with self.lock:
            out, self.now = self.now, Interval()
            return out


class Load:
    """The traffic: inference, weight cycles and bad requests against one daemon."""

    def __init__(
        self,
        target: str,
        zoo,
        bad_share: float,
        swap_every_s: float,
        stats: Stats,
        outside_path: str,
    ):
        self.stats = stats
        self.bad_share = bad_share
        self.swap_every_s = swap_every_s
        self.outside_path = outside_path
        self.stop = threading.Event()
        opts = [
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
        ]
        self.channel = grpc.insecure_channel(target, options=opts)
        self.stub = pb_grpc.ModelRunnerStub(self.channel)
        self.oip = ipb_grpc.GRPCInferenceServiceStub(self.channel)
        # Fixed inputs and every result they may legitimately give.
        self.x = {m: zoo.MODELS[m].inputs(4, seed=11) for m in ("mlp", "two_io")}
        self.two_io_want = zoo.eager("two_io", self.x["two_io"])
        module = zoo.MODELS["mlp"].module()
        torch.manual_seed(1234)
        self.new_weights = {
            k: (v + 0.05 * torch.randn_like(v)).contiguous() for k, v in module.state_dict().items()
        }
        self.mlp_want = [zoo.eager("mlp", self.x["mlp"])]
        with torch.no_grad():
            module.load_state_dict(self.new_weights)
            self.mlp_want.append([module(*self.x["mlp"])])
        self.run_req = {
            m: pb.RunRequest(model=m, inputs=[runner_codec.encode(t) for t in self.x[m]])
            for m in self.x
        }
        self.infer_req = {m: self._infer_request(m) for m in self.x}
        self.bad_requests = self._bad_requests(zoo)

    # ------------------------------------------------------------- requests

    def _infer_request(self, model: str) -> ipb.ModelInferRequest:
        names = {"mlp": ["x"], "two_io": ["x", "ids"]}[model]
        oip_dtype = {torch.float32: "FP32", torch.int64: "INT64"}
        req = ipb.ModelInferRequest(model_name=model)
        for name, t in zip(names, self.x[model]):
            req.inputs.add(name=name, datatype=oip_dtype[t.dtype], shape=list(t.shape))
            req.raw_input_contents.append(codec.tensor_bytes(t))
        return req

    def _bad_requests(self, zoo):
        x = self.x["mlp"][0]
        enc = runner_codec.encode
        wrong_shape = pb.RunRequest(model="mlp", inputs=[enc(torch.randn(4, 63))])
        wrong_dtype = pb.RunRequest(model="mlp", inputs=[enc(x.double())])
        truncated = pb.RunRequest(model="mlp", inputs=[enc(x)])
        truncated.inputs[0].data = truncated.inputs[0].data[:-3]
        # two_io was exported with batch <= 1024: the runner's shape guard refuses 1025.
        beyond_guard = pb.RunRequest(
            model="two_io", inputs=[enc(t) for t in zoo.MODELS["two_io"].inputs(1025)]
        )
        header = pb.UpdateConstantBufferHeader(
            model="mlp",
            use_inactive=True,
            constants=[
                pb.TensorSpec(name="fc1.weight", dtype=pb.DATA_TYPE_FLOAT32, shape=[64, 32])
            ],
        )
        return [
            (
                "run wrong shape",
                lambda: self.stub.Run(wrong_shape, timeout=30),
                CODE.INVALID_ARGUMENT,
            ),
            (
                "run wrong dtype",
                lambda: self.stub.Run(wrong_dtype, timeout=30),
                CODE.INVALID_ARGUMENT,
            ),
            ("run truncated", lambda: self.stub.Run(truncated, timeout=30), CODE.INVALID_ARGUMENT),
            (
                "run beyond shape guard",
                lambda: self.stub.Run(beyond_guard, timeout=30),
                CODE.INVALID_ARGUMENT,
            ),
            (
                "run unknown model",
                lambda: self.stub.Run(pb.RunRequest(model="nope"), timeout=30),
                CODE.NOT_FOUND,
            ),
            (
                "infer unknown input",
                lambda: self.oip.ModelInfer(
                    ipb.ModelInferRequest(
                        model_name="mlp",
                        inputs=[
                            ipb.ModelInferRequest.InferInputTensor(
                                name="y", datatype="FP32", shape=[1]
                            )
                        ],
                        raw_input_contents=[b"\0" * 4],
                    ),
                    timeout=30,
                ),
                CODE.INVALID_ARGUMENT,
            ),
            (
                "upload wrong shape",
                lambda: self.stub.UpdateConstantBuffer(
                    iter([pb.UpdateConstantBufferRequest(header=header)]), timeout=30
                ),
                CODE.INVALID_ARGUMENT,
            ),
            (
                "undecodable bytes",
                lambda: self.channel.unary_unary("/aotiserve.v1.ModelRunner/Run")(
                    b"\xff\xff\xff" + bytes(1024), timeout=30
                ),
                CODE.INVALID_ARGUMENT,
            ),
            (
                "blob outside roots",
                lambda: self.stub.UpdateConstantBufferFromBlob(
                    pb.UpdateConstantBufferFromBlobRequest(
                        model="mlp", weights_path=self.outside_path
                    ),
                    timeout=30,
                ),
                CODE.PERMISSION_DENIED,
            ),
        ]

    # ------------------------------------------------------------- threads

    def inference(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            if rng.random() < self.bad_share:
                name, call, want = rng.choice(self.bad_requests)
                try:
                    call()
                    self.stats.error("bad request answered OK", name)
                except grpc.RpcError as exc:
                    if exc.code() == want:
                        self.stats.bad()
                    else:
                        self.stats.error(f"bad request {name}", f"{exc.code()} {exc.details()}")
                continue
            model = rng.choice(("mlp", "two_io"))
            oip = rng.random() < 0.25
            began = time.perf_counter()
            try:
                if oip:
                    resp = self.oip.ModelInfer(self.infer_req[model], timeout=30)
                    outs = [
                        torch.frombuffer(
                            bytearray(raw),
                            dtype=codec.TORCH_DTYPE_BY_WIRE[
                                {"FP32": pb.DATA_TYPE_FLOAT32, "INT64": pb.DATA_TYPE_INT64}[
                                    o.datatype
                                ]
                            ],
                        ).reshape(list(o.shape))
                        for o, raw in zip(resp.outputs, resp.raw_output_contents)
                    ]
                else:
                    resp = self.stub.Run(self.run_req[model], timeout=30)
                    outs = [
                        codec.decode(t, f"output {i}").clone() for i, t in enumerate(resp.outputs)
                    ]
            except grpc.RpcError as exc:
                self.stats.error(
                    f"{'infer' if oip else 'run'} {model}", f"{exc.code()} {exc.details()}"
                )
                continue
            ms = (time.perf_counter() - began) * 1000
            wants = self.mlp_want if model == "mlp" else [self.two_io_want]
            if any(_close(outs, w) for w in wants):
                self.stats.good(ms)
            else:
                self.stats.error(f"wrong result {model}", "matches neither weight set")

    def _op(self, op: str, fn, ok_codes=()) -> bool:
        try:
            fn()
        except grpc.RpcError as exc:
            if exc.code() in ok_codes:
                self.stats.weight_op(op + "_refused")
                return False
            self.stats.error(f"weights {op}", f"{exc.code()} {exc.details()}")
            return False
        self.stats.weight_op(op)
        return True

    def _upload(self):
        msgs = [
            pb.UpdateConstantBufferRequest(
                header=pb.UpdateConstantBufferHeader(
                    model="mlp",
                    use_inactive=True,
                    validate_full_updates=True,
                    description="soak",
                    constants=[
                        pb.TensorSpec(name=n, dtype=codec.wire_dtype(t.dtype), shape=list(t.shape))
                        for n, t in self.new_weights.items()
                    ],
                )
            )
        ]
        for n, t in self.new_weights.items():
            data = codec.tensor_bytes(t)
            for off in range(0, max(1, len(data)), 4096):
                msgs.append(
                    pb.UpdateConstantBufferRequest(
                        chunk=pb.ConstantChunk(name=n, offset=off, data=data[off : off + 4096])
                    )
                )
        return self.stub.UpdateConstantBuffer(iter(msgs), timeout=60)

    def weights(self) -> None:
        """stage → swap → rollback → free, and every 4th cycle a stage freed unswapped."""
        cycle = 0
        model = "mlp"
        while not self.stop.wait(self.swap_every_s):
            cycle += 1
            if not self._op("stage", self._upload):
                continue
            if cycle % 4 == 0:
                self._op(
                    "free",
                    lambda: self.stub.FreeInactiveConstantBuffer(
                        pb.FreeInactiveConstantBufferRequest(model=model), timeout=30
                    ),
                )
                continue
            if not self._op(
                "swap",
                lambda: self.stub.SwapConstantBuffer(
                    pb.SwapConstantBufferRequest(model=model), timeout=30
                ),
            ):
                continue
            if self.stop.wait(self.swap_every_s / 2):
                break
            self._op(
                "rollback",
                lambda: self.stub.RollbackConstantBuffer(
                    pb.RollbackConstantBufferRequest(model=model), timeout=30
                ),
            )
            self._op(
                "free",
                lambda: self.stub.FreeInactiveConstantBuffer(
                    pb.FreeInactiveConstantBufferRequest(model=model), timeout=30
                ),
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=4, help="inference threads")
    p.add_argument("--interval-s", type=float, default=15.0, help="reporting interval")
    p.add_argument(
        "--warmup-s",
        type=float,
        default=None,
        help="RSS drift is measured from here (default: 20%% of the run, at most 120 s)",
    )
    p.add_argument("--swap-every-s", type=float, default=2.0)
    p.add_argument("--bad-share", type=float, default=0.05, help="share of malformed requests")
    p.add_argument("--runners", type=int, default=2, help="--runners-per-model of the daemon")
    p.add_argument("--json", help="write the summary here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    duration = a.minutes * 60
    warmup = a.warmup_s if a.warmup_s is not None else min(120.0, 0.2 * duration)
    zoo = _zoo()
    work = Path(tempfile.mkdtemp(prefix="aotiserve-soak-"))
    outside = work / "outside.blob"
    outside.write_bytes(b"\0" * 64)
    pkgs = {n: zoo.compiled(n) for n in ("mlp", "two_io")}
    server = procs.start_aotiserve(
        work / "daemon",
        pkgs,
        runners=a.runners,
        extra_args=[
            "--weights-dir",
            str(work / "weights"),
            "--allowed-root",
            str(work / "daemon" / "models"),
        ],
    )
    log.info(
        "daemon pid %d on %s; %d inference threads for %.1f min (warm-up %.0f s)",
        server.pid,
        server.target,
        a.threads,
        a.minutes,
        warmup,
    )
    stats = Stats()
    load = Load(server.target, zoo, a.bad_share, a.swap_every_s, stats, str(outside))
    threads = [
        threading.Thread(target=load.inference, args=(i,), daemon=True) for i in range(a.threads)
    ]
    threads.append(threading.Thread(target=load.weights, daemon=True))
    started = time.monotonic()
    for t in threads:
        t.start()
    rows = []
    rss_warm = None
    print(
        f"{'t_s':>6} {'good':>7} {'bad':>5} {'w_ops':>5} {'unexp':>5} {'p50_ms':>7} "
        f"{'p99_ms':>7} {'rss_mib':>8}",
        flush=True,
    )
    try:
        while True:
            left = duration - (time.monotonic() - started)
            if left <= 0:
                break
            time.sleep(min(a.interval_s, left))
            t = time.monotonic() - started
            iv = stats.take()
            alive = server.alive()
            rss = server.memory()["rss_mib"] if alive else float("nan")
            if not alive:
                stats.error("daemon died", f"exit status {server.proc.returncode}")
            if rss_warm is None and t >= warmup:
                rss_warm = rss
            row = {
                "t_s": round(t, 1),
                "good": iv.good,
                "bad": iv.bad,
                "weight_ops": iv.weight_ops,
                "unexpected": iv.unexpected,
                "p50_ms": round(_pct(iv.latencies_ms, 0.5), 3),
                "p99_ms": round(_pct(iv.latencies_ms, 0.99), 3),
                "rss_mib": round(rss, 1),
            }
            rows.append(row)
            print(
                f"{row['t_s']:>6} {iv.good:>7} {iv.bad:>5} {iv.weight_ops:>5} "
                f"{iv.unexpected:>5} {row['p50_ms']:>7} {row['p99_ms']:>7} {row['rss_mib']:>8}",
                flush=True,
            )
            if not alive:
                break
    finally:
        load.stop.set()
        for t in threads:
            t.join(60)
        final = stats.take()
        if final.unexpected:
            rows.append(
                {
                    "t_s": round(time.monotonic() - started, 1),
                    "good": final.good,
                    "bad": final.bad,
                    "weight_ops": final.weight_ops,
                    "unexpected": final.unexpected,
                }
            )
        load.channel.close()
        alive = server.alive()
        memory = server.memory() if alive else {}
        server.stop()
    after = [r["rss_mib"] for r in rows if r["t_s"] >= warmup and "rss_mib" in r]
    if rss_warm is None and after:
        rss_warm = after[0]
    rss_last = after[-1] if after else float("nan")
    drift = (rss_last - rss_warm) / rss_warm * 100 if rss_warm else float("nan")
    summary = {
        "minutes": a.minutes,
        "threads": a.threads,
        "warmup_s": warmup,
        "unexpected_errors": sum(stats.unexpected.values()),
        "unexpected_by_kind": dict(stats.unexpected),
        "unexpected_samples": stats.samples,
        "totals": dict(stats.totals),
        "rss_warm_mib": rss_warm,
        "rss_last_mib": rss_last,
        "rss_max_after_warmup_mib": max(after) if after else None,
        "rss_drift_pct": round(drift, 2),
        "rss_hwm_mib": memory.get("hwm_mib"),
        "p99_ms_median_interval": round(
            statistics.median(
                [r["p99_ms"] for r in rows if r.get("p99_ms") == r.get("p99_ms") and "p99_ms" in r]
                or [float("nan")]
            ),
            3,
        ),
        "intervals": rows,
        "daemon_alive_at_end": alive,
        "load_average": os.getloadavg(),
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "intervals"}, indent=1), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=1))
    failed = bool(summary["unexpected_errors"]) or not alive
    if failed:
        log.warning("keeping the daemon's folder (log, weights) for a look: %s", work)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
