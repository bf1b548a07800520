"""OIP ``ModelStatistics`` (Triton's statistics extension), read from the daemon's one store
of request and run statistics: runner_ext ``PortStats``, which the C++ hot path and the
Python paths both record into and which ``/metrics`` exposes. So the two agree:

| ModelStatistics | from | Prometheus |
|---|---|---|
| ``inference_stats.success`` count, ns | inference calls answered OK, their whole duration | ``aotiserve_requests{code="OK"}`` (methods below) |
| ``inference_stats.fail`` count, ns | inference calls answered with an error | ``aotiserve_requests{code!="OK"}`` |
| ``inference_count`` | = success count (calls, not rows of a call) | |
| ``execution_count`` | runs of the model (a dynamic batch is one run) | ``aotiserve_device_requests`` |
| ``inference_stats.queue`` | per run, the wait for a free runner | ``aotiserve_queue_seconds`` |
| ``inference_stats.compute_infer`` | per run, the time in the runner (device copies included) | ``aotiserve_compute_seconds`` |
| ``inference_stats.compute_input`` | per request the hot path ran, decoding and checking its inputs | |
| ``inference_stats.compute_output`` | per request the hot path answered, encoding its outputs | |
| ``batch_stats`` | per batch size (rows) of dynamic batching: runs, time in the runner | ``aotiserve_batch_size`` |
| ``last_inference`` | ms since the epoch of the last inference call answered | |

Inference calls are ``ModelInfer`` and the native ``Run``; each request sent on a
``ModelStreamInfer`` stream counts as one ``ModelInfer``. ``compute_input`` and
``compute_output`` are measured by the C++ hot path (requests it hands to Python, e.g. with
typed contents, are not in them). The counts cover the model's life in this process, every weights version
together; ``version`` is the version serving now.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .errors import NotFound

INFER_METHODS = frozenset(("Run", "ModelInfer"))


def _ns(seconds: float) -> int:
    return int(round(seconds * 1e9))


class _Totals:
    __slots__ = (
        "ok",
        "fail",
        "ok_ns",
        "fail_ns",
        "last_ms",
        "runs",
        "queue_ns",
        "compute_ns",
        "batches",
        "inputs",
        "outputs",
    )

    def __init__(self) -> None:
        self.ok = self.fail = self.ok_ns = self.fail_ns = self.last_ms = 0
        self.runs = self.queue_ns = self.compute_ns = 0
        self.inputs = self.outputs = (0, 0)  # (count, ns)
        self.batches: dict[int, tuple[int, int]] = {}


def _totals(snapshot: dict, names: Iterable[str]) -> dict[str, _Totals]:
    out = {name: _Totals() for name in names}
    for model, method, codes, _cumulative, _total in snapshot["methods"]:
        t = out.get(model)
        if t is not None and method in INFER_METHODS:
            t.ok += codes.get(0, 0)
            t.fail += sum(n for code, n in codes.items() if code != 0)
    for model, method, ok_ns, fail_ns, last_ms in snapshot["outcomes"]:
        t = out.get(model)
        if t is not None and method in INFER_METHODS:
            t.ok_ns += ok_ns
            t.fail_ns += fail_ns
            t.last_ms = max(t.last_ms, last_ms)
    for model, _device, _q_cum, q_sum, _c_cum, c_sum, runs in snapshot["devices"]:
        t = out.get(model)
        if t is not None:
            t.runs += runs
            t.queue_ns += _ns(q_sum)
            t.compute_ns += _ns(c_sum)
    for model, in_count, in_ns, out_count, out_ns in snapshot["io"]:
        t = out.get(model)
        if t is not None:
            t.inputs, t.outputs = (in_count, in_ns), (out_count, out_ns)
    for model, size, runs, compute_ns in snapshot["batches"]:
        t = out.get(model)
        if t is not None:
            t.batches[size] = (runs, compute_ns)
    return out


def model_statistics(pb: Any, stats: Any, served: dict[str, str], name: str, version: str) -> Any:
    """The ``ModelStatisticsResponse`` for model ``name`` (every served model when empty).

    ``pb``: the OIP messages; ``stats``: the ``PortStats`` store; ``served``: name -> the
    version serving now. An unknown name, or a version other than the one serving, is
    NOT_FOUND (as Triton answers).
    """
    if name:
        if name not in served:
            raise NotFound(f"ModelStatistics: no model named {name!r} is served")
        if version and version != served[name]:
            raise NotFound(
                f"ModelStatistics: model {name!r} has no version {version!r} "
                f"(serving version {served[name]!r})"
            )
        names = [name]
    else:
        names = sorted(served)
    totals = _totals(stats.stats(), names)
    duration = pb.StatisticDuration
    out = []
    for n in names:
        t = totals[n]
        out.append(
            pb.ModelStatistics(
                name=n,
                version=served[n],
                last_inference=t.last_ms,
                inference_count=t.ok,
                execution_count=t.runs,
                inference_stats=pb.InferStatistics(
                    success=duration(count=t.ok, ns=t.ok_ns),
                    fail=duration(count=t.fail, ns=t.fail_ns),
                    queue=duration(count=t.runs, ns=t.queue_ns),
                    compute_input=duration(count=t.inputs[0], ns=t.inputs[1]),
                    compute_infer=duration(count=t.runs, ns=t.compute_ns),
                    compute_output=duration(count=t.outputs[0], ns=t.outputs[1]),
                ),
                batch_stats=[
                    pb.InferBatchStatistics(
                        batch_size=size, compute_infer=duration(count=runs, ns=ns)
                    )
                    for size, (runs, ns) in sorted(t.batches.items())
                ],
            )
        )
    return pb.ModelStatisticsResponse(model_stats=out)
