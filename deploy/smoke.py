"""Smoke test of a running aotiserve container (called by deploy/image_test.sh).

With the aotiserve client: waits (bounded) until the server's grpc.health.v1
status is SERVING, lists the models, runs each READY one on random inputs
shaped from its specs (dynamic dimensions as 2) and checks the outputs'
shapes, then reads the metrics endpoint and checks the calls were counted.
Prints one line per step; exits 1 on the first failure.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.request

import numpy as np

from aotiserve.client import Client
from aotiserve.client.dtypes import BY_TORCH_NAME


def _random_input(spec) -> np.ndarray:
    shape = [d if d >= 0 else 2 for d in spec.shape]
    dtype = np.dtype(BY_TORCH_NAME[spec.dtype].numpy_name)
    if dtype.kind == "f":
        return np.random.default_rng(0).standard_normal(shape).astype(dtype)
    return np.zeros(shape, dtype=dtype)


def smoke(target: str, metrics: str | None, timeout: float) -> None:
    with Client(target, timeout=30) as client:
        start = time.monotonic()
        client.wait_until_ready(timeout=timeout)
        print(f"health: SERVING after {time.monotonic() - start:.1f} s")
        models = client.list_models()
        print("models: " + ", ".join(f"{m.name} ({m.state}, {'/'.join(m.devices)}, "
                                     f"weights {m.active_version.id if m.active_version else '-'})"
                                     for m in models))
        ready = [m for m in models if m.state == "READY"]
        if not ready:
            raise RuntimeError("no READY model")
        for info in ready:
            inputs = [_random_input(spec) for spec in info.inputs]
            t0 = time.perf_counter()
            outputs = client.model(info.name).run(inputs)
            ms = (time.perf_counter() - t0) * 1e3
            for spec, out in zip(info.outputs, outputs):
                want = [d for d in spec.shape]
                got = list(out.shape)
                if len(want) != len(got) or any(w not in (-1, g) for w, g in zip(want, got)):
                    raise RuntimeError(f"{info.name}: output {spec.name} shape {got}, spec {want}")
            print(f"run {info.name}: {[tuple(i.shape) for i in inputs]} -> "
                  f"{[(tuple(o.shape), str(o.dtype)) for o in outputs]} in {ms:.1f} ms; "
                  f"first row {np.asarray(outputs[0]).reshape(-1)[:3].round(4).tolist()}")
    if metrics:
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        counted = [line for line in text.splitlines()
                   if line.startswith("aotiserve_") and "_total{" in line and 'method="Run"' in line]
        if not counted:
            raise RuntimeError("metrics: no aotiserve_*_total{method=\"Run\"} sample")
        print(f"metrics: {counted[0]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="host:port of the gRPC port")
    parser.add_argument("--metrics", help="host:port of the metrics port")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for SERVING")
    args = parser.parse_args()
    try:
        smoke(args.target, args.metrics, args.timeout)
    except Exception as err:  # noqa: BLE001 - a smoke test reports, it does not recover
        print(f"smoke test failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
