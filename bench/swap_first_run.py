"""The first Run after a weight swap, for a package with runtime constant folding (what
``aotiserve pack`` compiles by default), against the steady p50 (issue 18: swaps warmed
before the flip).

torch's container computes a buffer's folded constants at the first run after the buffer
turns active, with every other run of the model held back meanwhile. The daemon's swap
folds the staged buffer before it flips, while runs go on (server/buffer_writes.py:
fold_inactive). Both are measured in one in-process daemon, interleaved: "before the flip"
(the daemon's behaviour) and "at first run" (the daemon's folding switched off for the
model, as torch alone does).
Each round stages a full set of new weights, swaps, times the first Run, then ``--runs``
more for the steady p50.

    python -m bench.swap_first_run [--rounds 5] [--runs 20] [--size 2048] [--layers 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


class Folded(torch.nn.Module):
    """``layers`` square Linear layers whose weights are scaled by a buffer: the scaled
    weights are folded constants, computed from the weights at run time."""

    def __init__(self, size: int, layers: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(size, size) for _ in range(layers))
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(x @ (layer.weight * self.scale).t() + layer.bias)
        return x


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args(argv)

    import wire
    from server_harness import running_server
    from torch.export import Dim

    from aotiserve.server.packaging import pack
    from aotiserve.v1 import model_runner_pb2 as pb

    folder = Path(tempfile.mkdtemp(prefix="aotiserve-swapfold-"))
    module = Folded(args.size, args.layers).eval()
    x = torch.randn(2, args.size)
    pack(module, (x,), folder / "folded.pt2", dynamic_shapes=({0: Dim("b", min=1, max=64)},))
    weights = [
        {k: v * f for k, v in module.state_dict().items()} for f in (0.9, 1.1)
    ]  # two sets to alternate between
    request = wire.run_request("folded", [x])
    times: dict[str, list[tuple[float, float]]] = {"before the flip": [], "at first run": []}
    with running_server([], model_repository=str(folder), runners_per_model=1) as srv:
        model = srv.app.registry.get("folded")
        assert model.folds_at_run_time, "the package folds nothing at run time"
        srv.stub.Run(request)
        for r in range(args.rounds):
            for mode in times:
                model.folds_at_run_time = mode == "before the flip"
                new = weights[(2 * r + len(times[mode])) % 2]
                srv.stub.UpdateConstantBuffer(
                    wire.upload_requests("folded", new, validate_full=True, chunk_bytes=4 << 20)
                )
                srv.stub.SwapConstantBuffer(pb.SwapConstantBufferRequest(model="folded"))
                t0 = time.perf_counter()
                out = wire.outputs(srv.stub.Run(request))[0]
                first = time.perf_counter() - t0
                steady = []
                for _ in range(args.runs):
                    t0 = time.perf_counter()
                    srv.stub.Run(request)
                    steady.append(time.perf_counter() - t0)
                ref = Folded(args.size, args.layers).eval()
                ref.load_state_dict(new)
                assert torch.allclose(out, ref(x), rtol=1e-3, atol=1e-3), mode
                times[mode].append((first, statistics.median(steady)))
        model.folds_at_run_time = True
    mib = sum(v.numel() * v.element_size() for v in module.state_dict().values()) / 2**20
    print(
        f"{args.layers} x Linear({args.size}) with folded scaled weights ({mib:.0f} MiB), CPU, "
        f"first Run after a swap vs steady p50, ms (median of {args.rounds} rounds):"
    )
    for mode, rounds in times.items():
        first = statistics.median(f for f, _ in rounds) * 1e3
        steady = statistics.median(p for _, p in rounds) * 1e3
        print(
            f"  folded {mode:15} first {first:8.2f}  steady {steady:8.2f}  "
            f"first / steady {first / steady:5.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
