"""PyTriton 0.7 serving one AOTInductor package (run by the PyTriton venv's python).

The package is loaded with ``torch._inductor.aoti_load_package`` in this
process; Triton (bundled 2.51) proxies requests to it. Batching is off so each
request runs as sent, like the other servers. Binds every endpoint to
127.0.0.1. The caller sets TMPDIR to a fresh folder (PyTriton refuses an
existing workspace) and LD_LIBRARY_PATH for the Python backend stub.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--package", required=True)
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--grpc-port", type=int, required=True)
    ap.add_argument("--http-port", type=int, required=True)
    ap.add_argument("--metrics-port", type=int, required=True)
    ap.add_argument("--in-features", type=int, default=64)
    ap.add_argument("--out-features", type=int, default=10)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    model = torch._inductor.aoti_load_package(args.package)

    def infer(requests):
        results = []
        with torch.no_grad():
            for req in requests:
                out = model(torch.from_numpy(req["input__0"]))
                out = out[0] if isinstance(out, (tuple, list)) else out
                results.append({"output__0": out.numpy()})
        return results

    config = TritonConfig(
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        http_address="127.0.0.1",
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        allow_metrics=False,
        exit_on_error=True,
        log_verbose=0,
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name=args.model,
            infer_func=infer,
            inputs=[Tensor(name="input__0", dtype=np.float32, shape=(-1, args.in_features))],
            outputs=[Tensor(name="output__0", dtype=np.float32, shape=(-1, args.out_features))],
            config=ModelConfig(batching=False),
        )
        triton.serve()


if __name__ == "__main__":
    main()
