"""Smoke test of a running aotiserve container (called by deploy/image_test.sh).

With the aotiserve client: waits (bounded) until the server's grpc.health.v1
status is SERVING, lists the models, runs each READY one on random inputs
shaped from its specs (dynamic dimensions as 2) and checks the outputs'
shapes, then reads the metrics endpoint and checks the calls were counted.

``--rollout MODEL`` then pulls the model's weights, changes one tensor, and
rolls the file out with ``aotiserve weights rollout`` (the operator command)
against the target: the outputs must change and the version with them; the
new version id is printed as ``VERSION=<id>``. ``--expect-version MODEL=ID``
checks a (restarted) daemon serves that version.
Prints one line per step; exits 1 on the first failure.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

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
        print(
            "models: "
            + ", ".join(
                f"{m.name} ({m.state}, {'/'.join(m.devices)}, "
                f"weights {m.active_version.id if m.active_version else '-'})"
                for m in models
            )
        )
        ready = [m for m in models if m.state == "READY"]
        if not ready:
            raise RuntimeError("no READY model")
        for info in ready:
            inputs = [_random_input(spec) for spec in info.inputs]
            client.model(info.name).run(inputs)  # the first call also pays client-side imports
            t0 = time.perf_counter()
            outputs = client.model(info.name).run(inputs)
            ms = (time.perf_counter() - t0) * 1e3
            for spec, out in zip(info.outputs, outputs):
                want = [d for d in spec.shape]
                got = list(out.shape)
                if len(want) != len(got) or any(w not in (-1, g) for w, g in zip(want, got)):
                    raise RuntimeError(f"{info.name}: output {spec.name} shape {got}, spec {want}")
            print(
                f"run {info.name}: {[tuple(i.shape) for i in inputs]} -> "
                f"{[(tuple(o.shape), str(o.dtype)) for o in outputs]} in {ms:.1f} ms; "
                f"first row {np.asarray(outputs[0]).reshape(-1)[:3].round(4).tolist()}"
            )
    if metrics:
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        counted = [
            line
            for line in text.splitlines()
            if line.startswith("aotiserve_") and "_total{" in line and 'method="Run"' in line
        ]
        if not counted or not counted[0].endswith(" 2.0"):
            raise RuntimeError(f"metrics: want 2 Run calls counted, got {counted}")
        print(f"metrics: {counted[0]}")


def rollout(target: str, model: str, token_file: str) -> str:
    """Pull, change, roll out: returns the new active version id."""
    from safetensors.numpy import load_file, save_file

    from aotiserve.client import weights

    token = Path(token_file).read_text().strip()
    with (
        Client(target, admin_token=token, timeout=60) as client,
        tempfile.TemporaryDirectory() as tmp,
    ):
        info = client.model(model).info()
        x = [_random_input(spec) for spec in info.inputs]
        before = np.asarray(client.model(model).run(x)[0])
        old = Path(tmp) / "old.safetensors"
        weights.pull(client, model, old)
        tensors = load_file(old)
        name = sorted(k for k in tensors if k.endswith("bias"))[-1]
        tensors[name] = tensors[name] + np.float32(1.0)
        new = Path(tmp) / f"{model}-v2.safetensors"
        save_file(tensors, new)
        cli = Path(sys.executable).with_name("aotiserve")
        out = subprocess.run(
            [
                str(cli),
                "--admin-token-file",
                token_file,
                "weights",
                "rollout",
                "--model",
                model,
                str(new),
                "--targets",
                target,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        # The command's table, without its progress bar's redraws.
        for line in out.stdout.replace("\r", "\n").splitlines():
            if line.strip():
                print(line.rstrip())
        if out.returncode != 0:
            raise RuntimeError(f"aotiserve weights rollout exited {out.returncode}: {out.stderr}")
        after = np.asarray(client.model(model).run(x)[0])
        delta = float(np.abs(after - before).max())
        if not delta > 0.5:
            raise RuntimeError(f"outputs did not change after the rollout (max delta {delta})")
        active = client.model(model).info().active_version
        print(
            f"rollout: {name} += 1 -> outputs moved by up to {delta:.3f}; "
            f"{model} serves {active.id} (was {info.active_version.id})"
        )
        print(f"VERSION={active.id}")
        return active.id


def expect_version(target: str, spec: str) -> None:
    model, _, want = spec.partition("=")
    with Client(target, timeout=30) as client:
        active = client.model(model).info().active_version
    got = active.id if active else None
    if got != want:
        raise RuntimeError(f"{model} serves weights {got}, expected {want}")
    print(f"weights: {model} still serves {got} after the restart")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="host:port of the gRPC port")
    parser.add_argument("--metrics", help="host:port of the metrics port")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for SERVING")
    parser.add_argument("--rollout", metavar="MODEL", help="roll changed weights out to MODEL")
    parser.add_argument("--admin-token-file", help="the daemon's admin token (for --rollout)")
    parser.add_argument("--expect-version", metavar="MODEL=ID", help="MODEL must serve weights ID")
    args = parser.parse_args()
    try:
        smoke(args.target, args.metrics, args.timeout)
        if args.expect_version:
            expect_version(args.target, args.expect_version)
        if args.rollout:
            rollout(args.target, args.rollout, args.admin_token_file)
    except Exception as err:  # noqa: BLE001 - a smoke test reports, it does not recover
        print(f"smoke test failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
